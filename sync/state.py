"""The tool's state in the target (schema ``_sync``): runs, checkpoints, the id map, quarantine, the lock.

One run at a time: a run holds a session-level advisory lock on a dedicated target connection for
its whole life. The lock dies with that connection, so a run killed with SIGKILL or cut off by the
network never blocks the next one. Behind a transaction-mode pooler a session lock would leak onto a
shared backend, so there the tool refuses to take it and asks for a direct or session-mode URL for
the target (reads may still use the transaction pooler).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from sync.connect import Endpoint, PoolMode, connect
from sync.errors import LockedError, LockLostError, UsageError, first_line
from sync.resources import sql_dir
from sync.retry import retrying

log = logging.getLogger("sync")

STATE_VERSION = 6
CATCH_UP_OVERLAP = timedelta(minutes=10)
"""How much before the last run's high-water mark a catch-up re-reads, unless told otherwise."""
LOCK_KEY = 0x53594E43  # "SYNC"
FENCE_KEY = 0x53594E44  # writers hold it shared: a new holder of LOCK_KEY waits for them to end


async def ensure_state(conn: asyncpg.Connection) -> None:
    """Create the ``_sync`` schema on first use (idempotent; safe under concurrent callers).

    ``conn`` is outside any transaction: the version is asked for directly, one statement, and a
    schema not there yet answers with an error.
    """
    try:
        if await conn.fetchval("SELECT max(version) FROM _sync.schema_version") == STATE_VERSION:
            return
    except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError):
        pass
    async with conn.transaction():
        # Serialise creators: CREATE ... IF NOT EXISTS still races on the catalog.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('_sync.schema'))")
        await conn.execute((sql_dir() / "state.sql").read_text())


WriteGuard = Callable[[asyncpg.Connection], Awaitable[None]]
"""Called inside a writer's transaction before it commits; raises when the run may no longer write."""


class RunLock:
    """The target's run lock, held on its own connection for the life of a run, and watched.

    Taking it bumps ``_sync.lock_epoch`` and first waits for the writes of an earlier holder still in
    flight (they hold the fence key shared, see :meth:`confirm`). When the lock's connection dies, the
    lock is taken again at once, and again before any batch commits: only when nobody else took it in
    between (the epoch has not moved). Otherwise the run stops with :class:`LockLostError` before it
    writes anything more, so two runs never write to one target at the same time.
    """

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.conn: asyncpg.Connection | None = None
        self.epoch: int | None = None
        self.pid: int | None = None
        self._retaking = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None

    async def acquire(self, conn: asyncpg.Connection | None = None) -> None:
        """Take the lock (on ``conn``, a target connection of its own, or a new one) or raise LockedError
        naming the run that holds it; writes nothing when refused."""
        if self.endpoint.mode is PoolMode.TRANSACTION:
            raise UsageError(
                "The target URL goes through a transaction-mode pooler (port 6543), which cannot hold the "
                "run lock: use the direct URL or the session pooler (port 5432) for --target."
            )
        if conn is None:
            conn = await connect(self.endpoint, application_name="sync lock")
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY):
            message = await _holder_message(conn)
            await conn.close()
            raise LockedError(message)
        await ensure_state(conn)
        # An earlier holder whose connection died may still be committing a batch: let it finish.
        await conn.execute(
            "SELECT pg_advisory_unlock($1) FROM (SELECT pg_advisory_lock($1) OFFSET 0) AS waited", FENCE_KEY
        )
        await self._hold(conn)

    async def confirm(self, conn: asyncpg.Connection) -> None:
        """Inside a writer's transaction on ``conn``, before it commits: prove the run still holds the lock.

        The transaction takes the fence key shared, so a run that takes the lock after ours was lost
        waits for it to end. A lock whose connection died is taken again here; LockLostError when
        another run has it or had it meanwhile.
        """
        for _ in range(2):
            pid = self.pid
            if pid is not None and await conn.fetchval(_FENCED_AND_HELD, FENCE_KEY, LOCK_KEY, pid):
                return
            if pid is None:
                await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", FENCE_KEY)
            await self.retake(pid)
        raise LockLostError(_LOST)

    async def retake(self, lost_pid: int | None) -> None:
        """Take the lock again after the connection that held it (``lost_pid``) died."""
        async with self._retaking:
            if self.pid != lost_pid:
                return  # another writer of this run took it again already
            await self._drop()
            log.warning("the run lock's connection was lost; taking the lock again")
            async for attempt in retrying(what="taking the run lock again"):
                with attempt:
                    conn = await connect(self.endpoint, application_name="sync lock")
                    try:
                        await self._retake_on(conn)
                    except BaseException:
                        conn.terminate()
                        raise
            log.warning("the run lock is held again (target backend pid %s)", self.pid)

    async def _retake_on(self, conn: asyncpg.Connection) -> None:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY):
            raise LockLostError(_LOST)
        if await conn.fetchval("SELECT epoch FROM _sync.lock_epoch") != self.epoch:
            raise LockLostError(_LOST)  # another run held it meanwhile
        await self._hold(conn)

    async def _hold(self, conn: asyncpg.Connection) -> None:
        self.epoch = await conn.fetchval("UPDATE _sync.lock_epoch SET epoch = epoch + 1 RETURNING epoch")
        self.pid = conn.get_server_pid()
        self.conn = conn
        conn.add_termination_listener(self._lost)

    def _lost(self, conn: asyncpg.Connection) -> None:
        """The lock's connection ended: take the lock again now rather than at the next commit."""
        if conn is self.conn and self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._retake_soon(conn.get_server_pid()))

    async def _retake_soon(self, lost_pid: int) -> None:
        try:
            await self.retake(lost_pid)
        except Exception as exc:  # the next commit meets the same failure and stops the run
            log.warning("the run lock could not be taken again: %s", first_line(exc))
        finally:
            self._watcher = None

    async def _drop(self) -> None:
        conn, self.conn, self.pid = self.conn, None, None
        if conn is not None:
            conn.remove_termination_listener(self._lost)
            if not conn.is_closed():
                conn.terminate()

    async def release(self) -> None:
        """Drop the lock (closing its connection drops it too)."""
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        conn, self.conn, self.pid = self.conn, None, None
        if conn is not None:
            conn.remove_termination_listener(self._lost)
            if not conn.is_closed():
                await conn.close()


_LOST = (
    "The run lock was lost (its connection to the target ended) and another sync took it: this run "
    "stopped without writing more; run the same command again once that one has finished to resume."
)

# The fence key ``$1`` taken shared for the transaction, then whether backend ``$3`` holds the run lock
# ``$2`` in this database: one round trip. The check refers to the fence's row, so it runs after the
# fence is held (a run that took the lock meanwhile waits for this transaction, or is seen here).
_FENCED_AND_HELD = (
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = $3 "
    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
    "AND classid = 0 AND objid = $2 AND objsubid = 1 AND fence.taken IS NOT NULL) "
    "FROM (SELECT pg_advisory_xact_lock_shared($1)::text AS taken OFFSET 0) AS fence"
)


async def _holder_message(conn: asyncpg.Connection) -> str:
    """Who holds the run lock, in one sentence."""
    holder = await conn.fetchrow(
        "SELECT a.pid FROM pg_locks AS l JOIN pg_stat_activity AS a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.objid = $1 AND l.objsubid = 1 AND l.granted LIMIT 1",
        LOCK_KEY,
    )
    running = (
        await conn.fetchrow(
            "SELECT id, started_at, options->>'host' AS host, options->>'pid' AS pid FROM _sync.runs "
            "WHERE status = 'running' ORDER BY id DESC LIMIT 1"
        )
        if await conn.fetchval("SELECT to_regclass('_sync.runs') IS NOT NULL")
        else None
    )
    who = (
        f"run {running['id']} (started {running['started_at']:%Y-%m-%d %H:%M:%S %Z} by pid "
        f"{running['pid']} on {running['host']})"
        if running
        else "another run"
    )
    backend = f", target backend pid {holder['pid']}" if holder else ""
    return f"Another sync is running on this target: {who}{backend}. Wait for it to finish."


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
    source: str | None = None,
) -> RunRecord:
    """Resume the unfinished run with the same ``since`` and ``source``, or start a new one.

    An unfinished run (crashed, killed, or failed) is continued from its checkpoints unless
    ``restart`` is set or another ``since`` is asked for; then it is marked interrupted. A quarantine
    retry (``retry``) is a run of its own that neither resumes nor interrupts the others. ``source``
    (the source database's identity) is recorded; another source's unfinished run is left alone.
    """
    stamp = {**options, "host": socket.gethostname(), "pid": os.getpid(), "source": source}
    if retry:
        run_id = await conn.fetchval(
            "INSERT INTO _sync.runs (since, options) VALUES (NULL, $1::jsonb) RETURNING id",
            json.dumps({**stamp, "retry": True}, default=str),
        )
        return RunRecord(run_id, None, None, resumed=False)
    unfinished = await conn.fetchrow(
        "SELECT id, since, high_water FROM _sync.runs WHERE status IN ('running', 'failed', 'interrupted') "
        "AND finished_at IS NULL AND NOT options ? 'retry' AND " + _SAME_SOURCE + " ORDER BY id DESC LIMIT 1",
        source,
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


# A run belongs to the source it read; runs recorded before sources were recorded belong to any.
_SAME_SOURCE = "($1::text IS NULL OR coalesce(options->>'source', $1::text) = $1::text)"


async def catch_up_since(
    conn: asyncpg.Connection, overlap: timedelta, source: str | None = None
) -> datetime | None:
    """Where a run without ``--since`` starts: the last successful run's source high-water mark.

    Only runs that read ``source`` (when given) count: another database's mark says nothing of this one.
    """
    return (await catch_up_point(conn, overlap, source))[0]


async def catch_up_point(
    conn: asyncpg.Connection, overlap: timedelta, source: str | None = None
) -> tuple[datetime | None, CaughtUpTo | None]:
    """:func:`catch_up_since` and :func:`catch_up_xmin` at once: one read of the last successful run."""
    row = await conn.fetchrow(
        "SELECT high_water, snapshot_xmin, snapshot FROM _sync.runs "
        "WHERE status IN ('succeeded', 'quarantined') "
        "AND high_water IS NOT NULL AND NOT options ? 'retry' AND "
        + _SAME_SOURCE
        + " ORDER BY id DESC LIMIT 1",
        source,
    )
    if row is None:
        return None, None
    xmin = row["snapshot_xmin"]
    return row["high_water"] - overlap, CaughtUpTo(xmin, row["snapshot"]) if xmin is not None else None


@dataclass(frozen=True)
class CaughtUpTo:
    """Where the last successful run's source snapshot stood: its xmin (64-bit) and, when recorded, the
    whole snapshot."""

    xmin: int
    snapshot: str | None


async def catch_up_xmin(conn: asyncpg.Connection, source: str | None = None) -> CaughtUpTo | None:
    """The last successful run's source snapshot: a catch-up reads every row version it did not see.

    The same run as :func:`catch_up_since`'s mark: transaction ids of another database mean nothing here.
    """
    return (await catch_up_point(conn, timedelta(0), source))[1]


async def record_high_water(
    conn: asyncpg.Connection,
    run_id: int,
    high_water: datetime,
    snapshot_xmin: int | None = None,
    snapshot: str | None = None,
) -> None:
    """Keep the first high-water mark and snapshot of a run: a resumed run keeps the earlier (safer)."""
    await conn.execute(
        "UPDATE _sync.runs SET high_water = coalesce(high_water, $2), "
        "snapshot_xmin = coalesce(snapshot_xmin, $3), "
        "snapshot = CASE WHEN snapshot_xmin IS NULL THEN $4 ELSE snapshot END WHERE id = $1",
        run_id,
        high_water,
        snapshot_xmin,
        snapshot,
    )


async def finish_run(
    conn: asyncpg.Connection,
    run_id: int,
    status: str,
    counts: dict[str, Any],
    deletes_basis: dict[str, Any] | None = None,
) -> None:
    """Close the run with its final status and counts, and what the next run settles deletes by (none
    unless given: a run that did not end well leaves none)."""
    await conn.execute(
        "UPDATE _sync.runs SET status = $2, counts = $3::jsonb, deletes_basis = $4::jsonb, "
        "finished_at = CASE WHEN $2 IN ('succeeded', 'quarantined') THEN now() END WHERE id = $1",
        run_id,
        status,
        json.dumps(counts, default=str),
        json.dumps(deletes_basis) if deletes_basis is not None else None,
    )


async def quarantined_keys(conn: asyncpg.Connection) -> dict[str, list[str]]:
    """The source keys of the rows still in quarantine, per table."""
    rows = await conn.fetch(
        "SELECT table_name, array_agg(source_key ORDER BY source_key) AS keys FROM _sync.quarantine "
        "WHERE resolved_at IS NULL GROUP BY table_name"
    )
    return {r["table_name"]: list(r["keys"]) for r in rows}
