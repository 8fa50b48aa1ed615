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
        open_one: Callable[[], Awaitable[asyncpg.Connection]],
        fits: Callable[[asyncpg.Connection], bool],
    ) -> None:
        self._open = open_one
        self._fits = fits
        self._idle: list[asyncpg.Connection] = []
        self._ahead: list[asyncio.Task[asyncpg.Connection]] = []

    def open_ahead(self) -> None:
        """Start opening a connection now, beside other work, for the first step that asks for one."""
        self._ahead.append(asyncio.ensure_future(self._open()))

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
            if not conn.is_closed() and self._fits(conn):
                return conn
            conn.terminate()
        return await self._open()

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
