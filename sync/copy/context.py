"""What a table's copy is given (:class:`CopyContext`, shared by a run's tables) and what it reports
(:class:`TableResult`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from pydantic import field_serializer

from sync.connect import Endpoint, PoolMode, connect
from sync.models import Model
from sync.plan import Plan
from sync.pool import IdleConnections
from sync.retry import bound_lock_waits
from sync.selection import Changes
from sync.snapshot import SourceSnapshot
from sync.state import WriteGuard

Progress = Callable[[str, int], None]


class TableResult(Model):
    """What one table's copy did."""

    table: str
    read: int = 0
    inserted: int = 0
    updated: int = 0
    quarantined: int = 0
    remapped: int = 0
    parents: int = 0
    """Of ``read``: rows outside the window that the window's rows need (the closure's pass)."""
    batches: int = 0
    retries: int = 0
    seconds: float = 0.0
    quiet: bool = False
    """Not read at all: the run's census found no row in its window, nor one that a child's needs."""

    @field_serializer("seconds")
    def _milliseconds(self, seconds: float) -> float:
        return round(seconds, 3)

    @property
    def written(self) -> int:
        return self.inserted + self.updated


@dataclass
class CopyContext:
    """What every table copy of a run shares."""

    plan: Plan
    source: SourceSnapshot
    target: Endpoint
    run_id: int
    since: datetime | None
    batch_size: int = 5000
    progress: Progress | None = None
    only_keys: dict[str, list[str]] | None = None
    """When set, copy only these source keys per table (``sync quarantine retry``)."""
    guard: WriteGuard | None = None
    """Proves the run still holds its lock, inside every write transaction before it commits."""
    changes: Changes | None = None
    """On a catch-up: the transactions since the previous run's snapshot; the rows they wrote are read."""
    jobs: int = 1
    """Parts of one pass copied at once, at most (each a source and a target connection)."""
    slots: asyncio.Semaphore | None = None
    """The run's job slots: a table's copy holds one, and each further part it copies at once takes one."""
    writers: IdleConnections = field(default=None)  # type: ignore[assignment]
    """The run's target connections for table copies, handed from one copy to the next."""

    def __post_init__(self) -> None:
        if self.writers is None:
            self.writers = target_writers(self.target)


def target_writers(target: Endpoint) -> IdleConnections:
    """Target connections for the table copies, each waiting at most ``LOCK_TIMEOUT_S`` for a lock (a
    session setting, the same for every table), kept between copies while outside any transaction.

    Behind a transaction pooler no session state holds, so each transaction bounds its own waits and
    no connection is kept.
    """

    pooled = target.mode is not PoolMode.TRANSACTION
    return IdleConnections(
        lambda: connect(target, application_name="sync writer"),
        lambda conn: pooled and not conn.is_in_transaction(),
        (lambda conn: bound_lock_waits(conn, local=False)) if pooled else None,
    )
