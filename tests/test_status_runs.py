"""`sync status` tells a run that died from one that is running, and says why a run failed."""

from __future__ import annotations

import asyncio
import json

import asyncpg
from click.testing import CliRunner

from sync.cli import main
from sync.state import LOCK_KEY, begin_run, ensure_state, finish_run


def status(url: str, *args: str):
    return CliRunner().invoke(main, ["status", "--target", url, *args])


async def _started_run(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        await ensure_state(conn)
        return (await begin_run(conn, None, restart=False, options={}, source="system 1/postgres")).id
    finally:
        await conn.close()


def test_a_run_whose_process_is_gone_is_shown_interrupted_not_running(supabase_db):
    run_id = asyncio.run(_started_run(supabase_db.url))
    shown = status(supabase_db.url)
    assert shown.exit_code == 0, shown.output
    assert "interrupted (process gone)" in shown.output
    runs = json.loads(status(supabase_db.url, "--json").stdout)["runs"]
    assert runs[0]["id"] == run_id and runs[0]["status"] == "interrupted"
    assert runs[0]["reason"] == "process gone"


def test_a_run_that_holds_the_lock_is_shown_running(supabase_db):
    asyncio.run(_started_run(supabase_db.url))

    async def holding() -> str:
        holder = await asyncpg.connect(supabase_db.url)
        try:
            await holder.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
            return (await asyncio.to_thread(status, supabase_db.url, "--json")).stdout
        finally:
            await holder.close()

    runs = json.loads(asyncio.run(holding()))["runs"]
    assert runs[0]["status"] == "running" and runs[0]["reason"] is None


def test_a_failed_run_is_shown_with_its_one_line_reason(supabase_db):
    async def failed() -> None:
        conn = await asyncpg.connect(supabase_db.url)
        try:
            await ensure_state(conn)
            run = await begin_run(conn, None, restart=False, options={}, source="system 1/postgres")
            reason = 'permission denied for sequence "counters_id_seq"'
            await finish_run(conn, run.id, "failed", {"tables": {}, "error": reason})
        finally:
            await conn.close()

    asyncio.run(failed())
    shown = status(supabase_db.url)
    assert 'run 1 failed: permission denied for sequence "counters_id_seq"' in shown.output
