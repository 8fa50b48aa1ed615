"""`sync status`, `sync quarantine retry`, Ctrl-C, and rows whose since-column is NULL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psycopg
from click.testing import CliRunner
from queries import SEED_MAPPING, ctrl_c_heard, execute, fetch, seed_run_args

from sync.cli import main


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def test_status_on_a_target_never_synced_says_so(supabase_db):
    result = cli("status", "--target", supabase_db.url)
    assert result.exit_code == 0
    assert "No sync has run on this target yet." in result.output


def test_status_shows_runs_progress_and_quarantine_and_retry_lands_the_fixed_rows(seed_dbs):
    source, target = seed_dbs
    profile = fetch(source.url, "SELECT id FROM public.profiles ORDER BY created_at DESC LIMIT 1")[0][0]
    execute(
        source.url,
        "INSERT INTO public.financing_requests (profile_id, amount, term_months, created_at, "
        "updated_at) VALUES (%s, 5000, 99, '2024-12-10', '2024-12-10')",
        profile,
    )
    first = cli(*seed_run_args(source, target, "--quiet"))
    assert first.exit_code == 3

    status = json.loads(cli("status", "--target", target.url, "--json", "--show").stdout)
    assert status["initialised"] and status["quarantined"] == 1
    assert status["runs"][0]["status"] == "quarantined"
    assert {p["table"] for p in status["progress"]} >= {"public.profiles", "public.documents"}
    assert all(p["done"] for p in status["progress"])
    (refused,) = status["quarantine"]
    assert refused["table"] == "public.financing_requests"
    assert "financing_requests_term_months_check" in refused["error"]
    assert refused["row"]["term_months"] == 99
    shown = cli("status", "--target", target.url, "--show")
    assert "Quarantined rows: 1" in shown.output and "term_months_check" in shown.output

    still = cli(
        "quarantine", "retry", "--source", source.url, "--target", target.url, "--mapping", str(SEED_MAPPING)
    )
    assert still.exit_code == 3, "nothing was fixed yet"
    execute(source.url, "UPDATE public.financing_requests SET term_months = 36 WHERE term_months = 99")
    retried = cli(
        "quarantine", "retry", "--source", source.url, "--target", target.url, "--mapping", str(SEED_MAPPING)
    )
    assert retried.exit_code == 0, retried.output
    assert "1 quarantined row(s) landed; 0 still refused." in retried.output
    assert fetch(target.url, "SELECT count(*) FROM public.financing_requests WHERE amount = 5000") == [(1,)]
    assert json.loads(cli("status", "--target", target.url, "--json").stdout)["quarantined"] == 0


def test_a_row_whose_since_column_is_null_is_not_skipped(make_db, tmp_path):
    source, target = make_db(), make_db()
    mapping = tmp_path / "empty.toml"
    mapping.write_text("[sync]\n")
    for db in (source, target):
        execute(db.url, "CREATE TABLE notes (id uuid PRIMARY KEY, body text, updated_at timestamptz)")
    execute(
        source.url,
        "INSERT INTO notes VALUES (gen_random_uuid(), 'undated', NULL), "
        "(gen_random_uuid(), 'old', '2020-01-01'), (gen_random_uuid(), 'new', '2024-12-01')",
    )
    result = cli(
        "run",
        "--since",
        "2024-11-18",
        "--source",
        source.url,
        "--target",
        target.url,
        "--mapping",
        str(mapping),
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    assert fetch(target.url, "SELECT body FROM notes ORDER BY body") == [("new",), ("undated",)]


def test_ctrl_c_stops_the_run_says_how_to_resume_and_the_rerun_finishes(seed_dbs):
    source, target = seed_dbs
    args = [sys.executable, "-m", "sync", *seed_run_args(source, target, "--batch-size", "20", "--jobs", "1")]
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=ctrl_c_heard,
    )
    deadline = time.monotonic() + 60
    with psycopg.connect(target.url, autocommit=True) as conn:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if conn.execute(
                    "SELECT EXISTS (SELECT 1 FROM _sync.checkpoints WHERE rows_done > 0)"
                ).fetchone()[0]:
                    break
            except psycopg.errors.UndefinedTable:
                pass
            time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "interrupted: every committed batch is kept; run the same command again to resume." in err
    assert "Traceback" not in err
    assert fetch(target.url, "SELECT status FROM _sync.runs") == [("interrupted",)]
    rerun = subprocess.run([*args, "--quiet"], capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert fetch(target.url, "SELECT count(*), max(status) FROM _sync.runs") == [(1, "succeeded")]
    prod = fetch(source.url, "SELECT count(*) FROM public.documents")[0][0]
    assert fetch(target.url, "SELECT count(*) FROM public.documents")[0][0] == prod + 8
