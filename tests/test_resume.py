"""Runs that die halfway, runs that overlap, and the cheap catch-up runs until cutover."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psycopg
import pytest
from queries import SEED_MAPPING, execute, fetch

from devkit import scenario
from sync.resources import sql_dir


def start(source, target, *args: str) -> subprocess.Popen[str]:
    """``sync run`` in its own process, as a user runs it."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sync",
            "run",
            "--source",
            source.url,
            "--target",
            target.url,
            "--mapping",
            str(SEED_MAPPING),
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def content(url: str) -> dict[str, str]:
    """Checksums of what the rows say, leaving out surrogate keys a rerun may allocate differently."""
    queries = {
        "auth.users": "SELECT to_jsonb(x) FROM auth.users x",
        "auth.identities": "SELECT to_jsonb(x) - 'id' FROM auth.identities x",
        "public.profiles": "SELECT to_jsonb(x) FROM public.profiles x",
        "public.financing_requests": "SELECT to_jsonb(x) - 'id' FROM public.financing_requests x",
        "public.bank_profiles": "SELECT to_jsonb(x) - 'id' FROM public.bank_profiles x",
        "public.documents": (
            "SELECT to_jsonb(d) - 'id' - 'request_id' || jsonb_build_object('request', "
            "jsonb_build_object('created_at', r.created_at, 'profile_id', r.profile_id)) "
            "FROM public.documents d LEFT JOIN public.financing_requests r ON r.id = d.request_id"
        ),
    }
    with psycopg.connect(url) as conn:
        return {
            table: conn.execute(
                f"SELECT md5(string_agg(j::text, '|' ORDER BY j::text)) FROM ({q}) AS t(j)"
            ).fetchone()[0]
            for table, q in queries.items()
        }


def wait_until(url: str, sql: str, proc: subprocess.Popen[str], timeout: float = 60) -> bool:
    """Poll ``sql`` on the target until it returns true; False if the run ended first."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            try:
                if conn.execute(sql).fetchone()[0]:  # type: ignore[index]
                    return True
            except psycopg.errors.UndefinedTable:
                pass
            time.sleep(0.005)
    return False


# Where a kill lands, each told by what the target shows at that moment.
STAGES = {
    "during the auth import": (
        "SELECT (SELECT count(*) FROM auth.users) > 1133 AND NOT EXISTS (SELECT 1 FROM _sync.checkpoints)"
    ),
    "mid-table": "SELECT EXISTS (SELECT 1 FROM _sync.checkpoints WHERE rows_done > 0 AND NOT done)",
    "between tables": (
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE wait_event = 'PgSleep' "
        "AND query LIKE '%_sync.checkpoints%')"
    ),
    "during the sequence step": (
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE wait_event = 'PgSleep' "
        "AND query LIKE '%_sync.runs%')"
    ),
}


def slow_down_state_writes(url: str) -> None:
    """Hold a run for a moment as a table is marked done and as the run is closed, so kills land there."""
    execute(
        url,
        """
        CREATE SCHEMA IF NOT EXISTS _sync;
    """,
    )
    with psycopg.connect(url) as conn:
        conn.execute((sql_dir() / "state.sql").read_text())  # type: ignore[arg-type]
        conn.execute("""
            CREATE FUNCTION _sync.pause() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN PERFORM pg_sleep(0.4); RETURN NEW; END $$;
            CREATE TRIGGER pause_done BEFORE INSERT OR UPDATE ON _sync.checkpoints
                FOR EACH ROW WHEN (NEW.done) EXECUTE FUNCTION _sync.pause();
            CREATE TRIGGER pause_finish BEFORE UPDATE ON _sync.runs
                FOR EACH ROW WHEN (NEW.status = 'succeeded') EXECUTE FUNCTION _sync.pause();
        """)


def test_a_run_killed_at_any_stage_and_rerun_ends_as_an_uninterrupted_run(seed_dbs, make_db, seed_templates):
    source, target = seed_dbs
    reference = make_db(seed_templates[1])
    code, _, err = finish(
        start(source, reference, "--since", "2024-11-18", "--batch-size", "50", "--jobs", "1", "--quiet")
    )
    assert code == 0, err
    expected = content(reference.url)

    slow_down_state_writes(target.url)
    landed = []
    for stage, condition in STAGES.items():
        proc = start(source, target, "--since", "2024-11-18", "--batch-size", "50", "--jobs", "1", "--quiet")
        if wait_until(target.url, condition, proc):
            proc.send_signal(signal.SIGKILL)
            landed.append(stage)
        finish(proc)
    assert landed == list(STAGES), f"kills landed only {landed}"
    code, _, err = finish(start(source, target, "--since", "2024-11-18", "--quiet"))
    assert code == 0, err
    assert content(target.url) == expected
    # A kill during the last state write may land after the server committed it: that run did finish,
    # and the rerun found nothing left to resume. Either way no run is left unfinished.
    unfinished = fetch(target.url, "SELECT count(*) FROM _sync.runs WHERE status <> 'succeeded'")
    assert unfinished == [(0,)]


def test_a_second_concurrent_run_is_refused_and_writes_nothing(seed_dbs):
    source, target = seed_dbs
    first = start(source, target, "--since", "2024-11-18", "--batch-size", "20", "--jobs", "1", "--quiet")
    try:
        assert wait_until(
            target.url, "SELECT EXISTS (SELECT 1 FROM _sync.checkpoints WHERE rows_done > 0)", first
        )
        before = fetch(
            target.url, "SELECT (SELECT count(*) FROM _sync.runs), (SELECT count(*) FROM auth.users)"
        )
        code, _, err = finish(start(source, target, "--since", "2024-11-18"), timeout=60)
        assert code != 0
        assert "Another sync is running on this target: run 1" in err
        assert "Traceback" not in err
        assert fetch(target.url, "SELECT count(*) FROM _sync.runs") == [(before[0][0],)]
    finally:
        code, _, err = finish(first)
    assert code == 0, err


@pytest.fixture
def synced_once(seed_dbs):
    source, target = seed_dbs
    code, _, err = finish(start(source, target, "--since", "2024-11-18", "--quiet"))
    assert code == 0, err
    return source, target


def catch_up(source, target) -> dict:
    import json

    code, out, err = finish(start(source, target, "--json"))
    assert code == 0, err
    return json.loads(out)


def written(report: dict) -> tuple[int, int]:
    return (sum(t["inserted"] for t in report["tables"]), sum(t["updated"] for t in report["tables"]))


def test_a_catch_up_copies_exactly_what_changed_and_a_second_one_nothing(synced_once):
    source, target = synced_once
    execute(
        source.url,
        """
        INSERT INTO public.financing_requests
                (profile_id, amount, term_months, status, created_at, updated_at)
            SELECT id, 12345, 12, 'submitted', now(), now() FROM public.profiles ORDER BY id LIMIT 50;
        UPDATE public.bank_profiles SET monthly_income = monthly_income + 1, updated_at = now()
            WHERE id IN (SELECT id FROM public.bank_profiles ORDER BY id LIMIT 20);
    """,
    )
    report = catch_up(source, target)
    assert written(report) == (50, 20)
    assert report["auth"]["created"] == 0
    assert fetch(target.url, "SELECT count(*) FROM public.financing_requests WHERE amount = 12345") == [(50,)]
    assert written(catch_up(source, target)) == (0, 0)


def test_target_rows_dated_in_the_future_do_not_hide_production_rows(synced_once):
    source, target = synced_once
    execute(target.url, "UPDATE public.financing_requests SET updated_at = '2031-01-01' WHERE id <= 10")
    execute(
        source.url,
        """
        INSERT INTO public.bank_profiles (profile_id, bank_name, created_at, updated_at)
            SELECT id, 'Nuevo', now(), now() FROM public.profiles ORDER BY id LIMIT 7;
    """,
    )
    report = catch_up(source, target)
    assert written(report) == (7, 0)


def test_a_catch_up_reads_from_the_sources_clock_minus_the_overlap(synced_once):
    _, target = synced_once
    first = fetch(target.url, "SELECT high_water FROM _sync.runs ORDER BY id LIMIT 1")[0][0]
    assert first is not None
    assert first > scenario.PROPOSAL_DATE


def test_a_catch_up_brings_a_user_who_signed_up_since_and_reads_only_changed_users(synced_once):
    source, target = synced_once
    # Production's signup trigger makes the profile, as the Auth server's insert would.
    execute(
        source.url,
        """
        INSERT INTO auth.users (instance_id, id, aud, role, email, encrypted_password, email_confirmed_at,
            confirmation_token, recovery_token, email_change_token_new, email_change,
            email_change_token_current, raw_app_meta_data, raw_user_meta_data, created_at, updated_at)
        VALUES ('00000000-0000-0000-0000-000000000000', 'a0000000-0000-4000-8000-000000000001',
            'authenticated', 'authenticated', 'nueva@ultima.mx',
            '$2b$04$abcdefghijklmnopqrstuu5tWcKdpCD2eOyDrQwF5vOFqOzjvYVJ6',
            now(), '', '', '', '', '', '{"provider": "email", "providers": ["email"]}',
            '{"full_name": "Nueva Persona"}', now(), now());
    """,
    )
    report = catch_up(source, target)
    assert report["auth"]["created"] == 1
    assert report["auth"]["source_users"] == 1, "only the users changed since the last run are read"
    assert written(report) == (0, 1), "the trigger made the profile; the copy completes it"
    assert fetch(
        target.url,
        "SELECT display_name FROM public.profiles WHERE id = 'a0000000-0000-4000-8000-000000000001'",
    ) == [("Nueva Persona",)]
