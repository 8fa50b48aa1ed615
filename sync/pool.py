"""A run's idle connections to one side, handed from one stage or table to the next.

Against a hosted database every new connection costs several round trips (TCP, TLS, SCRAM, the
session's settings) and every statement new to a connection one more (asyncpg prepares it first), so
a catch-up that opened a pair of connections per table paid more for its connections than for its
rows. A connection is given back only by a step that ended cleanly and only while it still fits (a
source reader inside the run's snapshot, a target connection outside any transaction); anything else
is closed, so no failed transaction, half-read COPY or lost snapshot is ever handed on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import asyncpg

from sync.connect import discard


class IdleConnections:
    """Connections to one side that a run opened and may use again; new ones opened as needed."""

    def __init__(
        self,
        connect_one: Callable[[], Awaitable[asyncpg.Connection]],
        fits: Callable[[asyncpg.Connection], bool],
        ready: Callable[[asyncpg.Connection], Awaitable[object]] | None = None,
    ) -> None:
        """``connect_one`` opens a connection; ``ready`` (when given) prepares a new one for its first
        step; ``fits`` says whether one a step gave back may serve the next."""
        self._connect = connect_one
        self._ready = ready
        self._fits = fits
        self._idle: list[asyncpg.Connection] = []
        self._ahead: list[asyncio.Future[asyncpg.Connection]] = []

    def open_ahead(self, count: int = 1) -> None:
        """Start opening ``count`` connections now, beside other work, for the first steps that ask for
        one (each made ready when it is taken: what it needs may not be there yet)."""
        self._ahead += [asyncio.ensure_future(self._connect()) for _ in range(count)]

    async def take(self) -> asyncpg.Connection:
        """An idle connection that still fits, else one opened ahead, else a new one."""
        while self._idle:
            conn = self._idle.pop()
            if not conn.is_closed() and self._fits(conn):
                return conn
            conn.terminate()
        while self._ahead:
            try:
                conn = await self._ahead.pop(0)
            except Exception:
                continue  # opened again below, where a failure is the step's own
            if not conn.is_closed():
                return await self._readied(conn)
        return await self._readied(await self._connect())

    async def _readied(self, conn: asyncpg.Connection) -> asyncpg.Connection:
        """A new connection, prepared for its first step (closed when that fails)."""
        if self._ready is not None:
            try:
                await self._ready(conn)
            except BaseException:
                conn.terminate()
                raise
        return conn

    def give_back(self, conn: asyncpg.Connection) -> None:
        """Keep ``conn`` for the next step when it still fits; close it otherwise.

        Only a step that ended cleanly gives its connection back: one that failed closes it (its
        transaction may be aborted, or a COPY cut short).
        """
        if conn.is_closed():
            return
        if self._fits(conn):
            self._idle.append(conn)
        else:
            conn.terminate()

    async def close(self) -> None:
        """Close every idle connection (and those still opening ahead)."""
        ahead, self._ahead = self._ahead, []
        idle, self._idle = self._idle, []
        await asyncio.gather(
            discard(*ahead), *(conn.close() for conn in idle if not conn.is_closed()), return_exceptions=True
        )
