"""What the tests' local HTTP services share: a loopback listener and a database pool, closed on exit."""

from __future__ import annotations

import asyncio
import socket
from typing import Self

import asyncpg
from aiohttp import web


class LocalHttpService:
    """Listens on a free 127.0.0.1 port and owns an asyncpg pool; subclasses build the app in ``start``."""

    _runner: web.AppRunner | None = None
    _port: int | None = None
    _pool: asyncpg.Pool | None = None

    async def start(self) -> None:
        raise NotImplementedError

    async def _listen(self, app: web.Application) -> None:
        # A short shutdown grace: a handler parked in a "slow" fault must not hold up the test.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self._port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    async def close(self) -> None:
        """Stop listening and close the database pool."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), timeout=5)
            except TimeoutError:
                self._pool.terminate()
            self._pool = None
        self._port = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def pool(self) -> asyncpg.Pool:
        """The asyncpg pool the endpoints use."""
        if self._pool is None:
            raise RuntimeError("the server is not running")
        return self._pool
