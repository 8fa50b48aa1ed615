"""One consistent view of the source for every reader of a run: an exported snapshot.

The coordinator opens a ``REPEATABLE READ READ ONLY`` transaction, exports its snapshot and keeps the
transaction open for the run; each reader joins it with ``SET TRANSACTION SNAPSHOT``, so parallel
jobs read the same instant. A transaction-mode pooler cannot hold that transaction across
statements; there, and after the coordinator is lost, readers fall back to a fresh read-only
transaction per batch (said in the plan and the run's log).

A reader whose step ended cleanly is given back (:meth:`SourceSnapshot.give_back`) and handed to the
next step that asks for one, still inside the snapshot: a catch-up's census, production deletes, auth
import and table passes share a few readers rather than opening a pair of connections each.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from sync.connect import Endpoint, PoolMode, connect
from sync.pool import IdleConnections

log = logging.getLogger("sync")

# The transaction's snapshot (in REPEATABLE READ, the exported one) as 64-bit transaction ids.
_XIDS = (
    "pg_snapshot_xmin(pg_current_snapshot())::text::bigint, "
    "pg_snapshot_xmax(pg_current_snapshot())::text::bigint, "
    "pg_current_snapshot()::text"
)


@dataclass(frozen=True)
class XidRange:
    """A snapshot's bounds as 64-bit transaction ids (epoch included, so they never wrap around).

    Every transaction that committed after the snapshot was taken, or was still running then, has an
    id at or above ``xmin``; every row version the snapshot sees was written below ``xmax``.
    """

    xmin: int
    xmax: int
    snapshot: str
    """The whole snapshot (``xmin:xmax:xip,…``): which transactions in between it saw."""


async def current_xids(conn: asyncpg.Connection) -> XidRange:
    """The bounds of ``conn``'s current snapshot (in a repeatable-read transaction, the transaction's)."""
    return XidRange(*await conn.fetchrow(f"SELECT {_XIDS}"))


class SourceSnapshot:
    """The run's view of the source: its snapshot id (when one could be exported) and its clock."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.snapshot_id: str | None = None
        self.high_water: datetime | None = None
        self.xids: XidRange | None = None
        """The snapshot's xmin and xmax (64-bit): what a later catch-up reads from, and this one up to."""
        self._coordinator: asyncpg.Connection | None = None
        self._tx: asyncpg.transaction.Transaction | None = None
        # A reader is kept only while it is inside the shared snapshot (in its transaction, which a
        # reader never ends); without one each reader reads an instant of its own and is not kept.
        self._readers = IdleConnections(
            lambda: connect(self.endpoint, application_name="sync reader"),
            lambda conn: self.shared and conn.is_in_transaction(),
            self.begin,
        )

    async def open(self, conn: asyncpg.Connection | None = None) -> SourceSnapshot:
        """Export the snapshot (where the connection can hold one) and read the source's clock, on
        ``conn`` (a source connection outside any transaction, now the snapshot's) or a new one."""
        if conn is None:
            conn = await connect(self.endpoint, application_name="sync coordinator")
        if self.endpoint.mode is PoolMode.TRANSACTION:
            # Reads come later than this snapshot, so its xmin is still a safe mark for the next run.
            try:
                self.high_water, *xids = await conn.fetchrow(f"SELECT now(), {_XIDS}")
            finally:
                conn.terminate()
            self.xids = XidRange(*xids)
            log.info("source is behind a transaction pooler: no shared snapshot, reads are per batch")
            return self
        self._coordinator = conn
        self._tx = conn.transaction(isolation="repeatable_read", readonly=True)
        await self._tx.start()
        self.snapshot_id, self.high_water, *xids = await conn.fetchrow(
            f"SELECT pg_export_snapshot(), now(), {_XIDS}"
        )
        self.xids = XidRange(*xids)
        return self

    @property
    def shared(self) -> bool:
        """Whether readers share one snapshot (the coordinator is alive)."""
        return (
            self.snapshot_id is not None
            and self._coordinator is not None
            and not self._coordinator.is_closed()
        )

    async def held(self) -> bool:
        """Whether the snapshot is still there to join (asked of the coordinator): then every reader of
        the run read in it, and everything the run landed was in it."""
        if not self.shared:
            return False
        try:
            await self._coordinator.execute("SELECT 1")
        except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError):
            return False
        return True

    async def reader(self) -> asyncpg.Connection:
        """A source connection, read-only, inside the shared snapshot when there is one: one an earlier
        step gave back, else a new one."""
        return await self._readers.take()

    def give_back(self, reader: asyncpg.Connection) -> None:
        """Return a reader whose step ended cleanly, for the next step (closed when it cannot be kept)."""
        self._readers.give_back(reader)

    def connect_ahead(self, readers: int) -> None:
        """Start opening ``readers`` connections now, beside other work; they join the snapshot when a
        step first asks for a reader."""
        self._readers.open_ahead(readers)

    async def begin(self, conn: asyncpg.Connection) -> asyncpg.transaction.Transaction:
        """Open ``conn``'s read-only transaction, joining the snapshot if it is still there."""
        tx = conn.transaction(isolation="repeatable_read", readonly=True)
        await tx.start()
        if self.shared:
            try:
                await conn.execute(f"SET TRANSACTION SNAPSHOT '{self.snapshot_id}'")
            except asyncpg.PostgresError as exc:
                # The exporting transaction is gone: go on from a fresh snapshot rather than fail.
                log.warning("shared source snapshot lost (%s); reading from a fresh one", exc)
                self.snapshot_id = None
                await tx.rollback()
                tx = conn.transaction(isolation="repeatable_read", readonly=True)
                await tx.start()
        return tx

    async def close(self) -> None:
        """Close the idle readers (and those still opening), then end the coordinator's transaction and
        connection."""
        await self._readers.close()
        if self._coordinator is not None and not self._coordinator.is_closed():
            try:
                if self._tx is not None:
                    await self._tx.rollback()
            finally:
                await self._coordinator.close()
        self._coordinator = None
