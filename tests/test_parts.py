"""A large table copied in key ranges at once: the same rows as a copy in one piece, and resumable."""

from __future__ import annotations

import json
import signal

import psycopg
from queries import execute, fetch
from test_resume import content, finish, start, wait_until

from sync.resources import sql_dir

ARGS = ("--since", "2024-11-18", "--batch-size", "50")
PARTS = "starts_with(table_name, 'public.profiles (part ')"


def run_json(source, target, *args: str) -> dict:
    code, out, err = finish(start(source, target, *ARGS, *args, "--json"))
    assert code == 0, err
    return json.loads(out)


def rows_done(url: str) -> dict[str, int]:
    """Rows each table's checkpoints (its parts' included) say were committed."""
    rows = fetch(
        url, "SELECT table_name, rows_done FROM _sync.checkpoints WHERE table_name NOT LIKE '% pass)%'"
    )
    done: dict[str, int] = {}
    for name, count in rows:
        table = name.split(" (part ")[0]
        done[table] = done.get(table, 0) + count
    return done


def serial_reference(source, make_db, seed_templates) -> tuple[dict[str, str], dict[str, int]]:
    """What a copy with one job leaves on a fresh target: row checksums, and rows read per table."""
    reference = make_db(seed_templates[1])
    report = run_json(source, reference, "--jobs", "1")
    assert fetch(reference.url, f"SELECT count(*) FROM _sync.checkpoints WHERE {PARTS}") == [(0,)]
    return content(reference.url), {t["table"]: t["read"] for t in report["tables"]}


def test_a_table_copied_in_parts_ends_as_a_copy_in_one_piece(seed_dbs, make_db, seed_templates):
    source, target = seed_dbs
    expected, read = serial_reference(source, make_db, seed_templates)

    report = run_json(source, target, "--jobs", "4")
    parts = fetch(target.url, f"SELECT table_name, rows_done, done FROM _sync.checkpoints WHERE {PARTS}")
    assert len(parts) == 4 and all(done for _, _, done in parts), parts
    assert all(rows > 0 for _, rows, _ in parts), "every part copied rows of its own"
    assert content(target.url) == expected
    assert {t["table"]: t["read"] for t in report["tables"]} == read
    assert rows_done(target.url) == read


def pause_part_checkpoints(url: str) -> None:
    """Hold every part's batch for a moment as it commits, so a kill lands while parts are under way."""
    execute(url, "CREATE SCHEMA IF NOT EXISTS _sync")
    with psycopg.connect(url) as conn:
        conn.execute((sql_dir() / "state.sql").read_text())  # type: ignore[arg-type]
        conn.execute("""
            CREATE FUNCTION _sync.pause() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN PERFORM pg_sleep(0.02); RETURN NEW; END $$;
            CREATE TRIGGER pause_part BEFORE UPDATE ON _sync.checkpoints
                FOR EACH ROW WHEN (NEW.table_name LIKE '% (part %') EXECUTE FUNCTION _sync.pause();
        """)


def test_a_run_killed_while_parts_are_copied_resumes_each_part_and_ends_equal(
    seed_dbs, make_db, seed_templates
):
    source, target = seed_dbs
    expected, read = serial_reference(source, make_db, seed_templates)
    pause_part_checkpoints(target.url)

    proc = start(source, target, *ARGS, "--jobs", "4", "--quiet")
    under_way = f"SELECT count(*) >= 2 FROM _sync.checkpoints WHERE {PARTS} AND rows_done > 0 AND NOT done"
    assert wait_until(target.url, under_way, proc), "the run ended before its parts were under way"
    proc.send_signal(signal.SIGKILL)
    finish(proc)
    cut = fetch(target.url, f"SELECT table_name, last_key FROM _sync.checkpoints WHERE {PARTS} AND NOT done")
    assert cut, "the kill left parts unfinished"

    report = run_json(source, target, "--jobs", "4")
    assert report["resumed"] is True
    assert content(target.url) == expected
    # Every committed batch counted once: nothing copied twice, nothing skipped.
    assert rows_done(target.url) == read
    assert fetch(target.url, f"SELECT bool_and(done) FROM _sync.checkpoints WHERE {PARTS}") == [(True,)]
