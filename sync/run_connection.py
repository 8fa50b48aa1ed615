"""A run's own connections: the lock's, opened while the plan is read, and the run's record's, the
target connection the plan was read on.

On a remote server each new connection is several round trips before its first statement, so a run
opens its lock's connection beside the catalog reads (opening one writes nothing: the lock is taken only
after the preflight passed) and keeps the connections the plan and the preflight used rather than
opening others: the target's for the run's record and the source's for the snapshot.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg

from sync.connect import Endpoint, PoolMode, connect
from sync.retry import is_transient_db_error, retrying
from sync.state import RunLock

T = TypeVar("T")


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
        if opening is None:
            return
        opening.cancel()
        opened = (await asyncio.gather(opening, return_exceptions=True))[0]
        if isinstance(opened, asyncpg.Connection):
            await opened.close()


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
