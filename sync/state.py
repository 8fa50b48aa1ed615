"""The tool's state in the target (schema ``_sync``): runs, checkpoints, the id map, quarantine, the lock.

One run at a time: a run holds a session-level advisory lock on a dedicated target connection for
its whole life. The lock dies with that connection, so a run killed with SIGKILL or cut off by the
network never blocks the next one. Behind a transaction-mode pooler a session lock would leak onto a
shared backend, so there the tool refuses to take it and asks for a direct or session-mode URL for
the target (reads may still use the transaction pooler).
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from sync.connect import Endpoint, PoolMode, connect
from sync.errors import LockedError, UsageError
from sync.resources import sql_dir

STATE_VERSION = 2
LOCK_KEY = 0x53594E43  # "SYNC"


async def ensure_state(conn: asyncpg.Connection) -> None:
    """Create the ``_sync`` schema on first use (idempotent; safe under concurrent callers)."""
    exists = await conn.fetchval("SELECT to_regclass('_sync.schema_version') IS NOT NULL")
    if exists and await conn.fetchval("SELECT max(version) FROM _sync.schema_version") == STATE_VERSION:
        return
    async with conn.transaction():
        # Serialise creators: CREATE ... IF NOT EXISTS still races on the catalog.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('_sync.schema'))")
        await conn.execute((sql_dir() / "state.sql").read_text())


class RunLock:
    """The target's run lock, held on its own connection for the life of a run."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.conn: asyncpg.Connection | None = None

    async def acquire(self) -> None:
        """Take the lock or raise LockedError naming the run that holds it; writes nothing."""
        if self.endpoint.mode is PoolMode.TRANSACTION:
            raise UsageError(
                "The target URL goes through a transaction-mode pooler (port 6543), which cannot hold the "
                "run lock: use the direct URL or the session pooler (port 5432) for --target."
            )
        self.conn = await connect(self.endpoint, application_name="sync lock")
        if await self.conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY):
            return
        holder = await self.conn.fetchrow(
            "SELECT a.pid, a.client_addr::text AS addr, a.backend_start FROM pg_locks AS l "
            "JOIN pg_stat_activity AS a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.objid = $1 AND l.granted LIMIT 1",
            LOCK_KEY,
        )
        running = (
            await self.conn.fetchrow(
                "SELECT id, started_at, options->>'host' AS host, options->>'pid' AS pid FROM _sync.runs "
                "WHERE status = 'running' ORDER BY id DESC LIMIT 1"
            )
            if await self.conn.fetchval("SELECT to_regclass('_sync.runs') IS NOT NULL")
            else None
        )
        await self.release()
        who = (
            f"run {running['id']} (started {running['started_at']:%Y-%m-%d %H:%M:%S %Z} by pid "
            f"{running['pid']} on {running['host']})"
            if running
            else "another run"
        )
        backend = f", target backend pid {holder['pid']}" if holder else ""
        raise LockedError(f"Another sync is running on this target: {who}{backend}. Wait for it to finish.")

    async def release(self) -> None:
        """Drop the lock (closing its connection drops it too)."""
        if self.conn is not None and not self.conn.is_closed():
            await self.conn.close()
        self.conn = None


@dataclass(frozen=True)
class RunRecord:
    """A run as stored in ``_sync.runs``; ``resumed`` when it continues an unfinished run."""

    id: int
    since: datetime | None
    high_water: datetime | None
    resumed: bool


async def begin_run(
    conn: asyncpg.Connection,
    since: datetime | None,
    *,
    restart: bool,
    options: dict[str, Any],
    retry: bool = False,
) -> RunRecord:
    """Resume the unfinished run with the same ``since``, or start a new one.

    An unfinished run (crashed, killed, or failed) is continued from its checkpoints unless
    ``restart`` is set or another ``since`` is asked for; then it is marked interrupted. A quarantine
    retry (``retry``) is a run of its own that neither resumes nor interrupts the others.
    """
    stamp = {**options, "host": socket.gethostname(), "pid": os.getpid()}
    if retry:
        run_id = await conn.fetchval(
            "INSERT INTO _sync.runs (since, options) VALUES (NULL, $1::jsonb) RETURNING id",
            json.dumps({**stamp, "retry": True}, default=str),
        )
        return RunRecord(run_id, None, None, resumed=False)
    unfinished = await conn.fetchrow(
        "SELECT id, since, high_water FROM _sync.runs WHERE status IN ('running', 'failed', 'interrupted') "
        "AND finished_at IS NULL AND NOT options ? 'retry' ORDER BY id DESC LIMIT 1"
    )
    if unfinished is not None and not restart and (since is None or since == unfinished["since"]):
        await conn.execute(
            "UPDATE _sync.runs SET status = 'running', options = options || $2::jsonb WHERE id = $1",
            unfinished["id"],
            json.dumps(stamp, default=str),
        )
        return RunRecord(unfinished["id"], unfinished["since"], unfinished["high_water"], resumed=True)
    if unfinished is not None:
        await conn.execute(
            "UPDATE _sync.runs SET status = 'interrupted', finished_at = now() WHERE id = $1",
            unfinished["id"],
        )
    run_id = await conn.fetchval(
        "INSERT INTO _sync.runs (since, options) VALUES ($1, $2::jsonb) RETURNING id",
        since,
        json.dumps(stamp, default=str),
    )
    return RunRecord(run_id, since, None, resumed=False)


async def catch_up_since(conn: asyncpg.Connection, overlap: timedelta) -> datetime | None:
    """Where a run without ``--since`` starts: the last successful run's source high-water mark."""
    mark = await conn.fetchval(
        "SELECT high_water FROM _sync.runs WHERE status IN ('succeeded', 'quarantined') "
        "AND high_water IS NOT NULL AND NOT options ? 'retry' ORDER BY id DESC LIMIT 1"
    )
    return mark - overlap if mark is not None else None


async def record_high_water(conn: asyncpg.Connection, run_id: int, high_water: datetime) -> None:
    """Keep the first high-water mark of a run: a resumed run keeps the earlier (safer) one."""
    await conn.execute(
        "UPDATE _sync.runs SET high_water = coalesce(high_water, $2) WHERE id = $1", run_id, high_water
    )


async def finish_run(conn: asyncpg.Connection, run_id: int, status: str, counts: dict[str, Any]) -> None:
    """Close the run with its final status and counts."""
    await conn.execute(
        "UPDATE _sync.runs SET status = $2, counts = $3::jsonb, "
        "finished_at = CASE WHEN $2 IN ('succeeded', 'quarantined') THEN now() END WHERE id = $1",
        run_id,
        status,
        json.dumps(counts, default=str),
    )
