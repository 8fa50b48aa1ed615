"""A run's own connections: the plan's, the lock's and the run's record's.

On a remote server each new connection is several round trips before its first statement, so a run
opens its first connections while it probes how each side pools them (as the DSN says: a session,
unless its port is a transaction pooler's; opened again in the rare case the probe finds otherwise),
opens its lock's connection beside the catalog reads (opening one writes nothing: the lock is taken
only after the preflight passed) and keeps the connections the plan and the preflight used rather than
opening others: the target's for the run's record and the source's for the snapshot.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg

from sync.connect import Endpoint, PoolMode, connect, connect_both, discard
from sync.preflight import reach
from sync.retry import is_transient_db_error, retrying
from sync.state import RunLock

T = TypeVar("T")


Sides = tuple[asyncpg.Connection, asyncpg.Connection]


async def reach_early(
    source: Endpoint, target: Endpoint
) -> tuple[Endpoint, Endpoint, asyncio.Future[Sides] | None, LockConnection]:
    """Both endpoints with their pool modes (:func:`sync.preflight.reach`), the plan's connections to
    (source, target) opening (None when the probe changed a mode: the plan opens its own) and the lock's
    (opening while the catalogs are read).
    """
    sides = asyncio.ensure_future(connect_both(source, target))  # the source's first, as the probe's
    try:
        reached = await reach(source, target)
    except BaseException:
        await discard(sides)
        raise
    if (reached[0].mode, reached[1].mode) != (source.mode, target.mode):
        await discard(sides)
        return *reached, None, LockConnection(reached[1])
    return *reached, sides, LockConnection(reached[1])


class LockConnection:
    """The lock's own target connection, opening from the start of the run until the lock is taken."""

    def __init__(self, target: Endpoint) -> None:
        # Behind a transaction pooler the lock is refused before any connection is needed.
        self._opening = (
            asyncio.ensure_future(connect(target, application_name="sync lock"))
            if target.mode is not PoolMode.TRANSACTION
            else None
        )

    async def take(self, lock: RunLock) -> None:
        """Take ``lock`` on this connection (refused: LockedError, and the connection is closed)."""
        opening, self._opening = self._opening, None
        await lock.acquire(await opening if opening is not None else None)

    async def discard(self) -> None:
        """Close the connection when the run ends before it took the lock."""
        opening, self._opening = self._opening, None
        await discard(opening)


class RunConnection:
    """The run's own target connection (its record, the sequences), opened again after it was lost."""

    def __init__(self, target: Endpoint, conn: asyncpg.Connection) -> None:
        self.target = target
        self.conn = conn

    async def call(self, step: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """``step(conn)``, retried on a fresh connection when a restart or failover cut the last one."""

        async def attempt() -> T:
            conn = await self.alive()
            try:
                return await step(conn)
            except Exception as exc:
                if is_transient_db_error(exc):
                    self.conn.terminate()
                raise

        return await retrying(what="the run's own record")(attempt)

    async def alive(self) -> asyncpg.Connection:
        """The connection, opened again when it was closed."""
        if self.conn.is_closed():
            self.conn = await connect(self.target, application_name="sync run")
        return self.conn

    async def close(self) -> None:
        if not self.conn.is_closed():
            await self.conn.close()
