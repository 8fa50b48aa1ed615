"""What a run leaves for the next one to settle production deletes by counting (see :mod:`.find`).

A run that ends with every read in one source snapshot records that snapshot and, per table, the
source's rows in it and the production deletes it left on the target. The next run may count against
it only when that run was the last on the target: anything a later run (or a retry) landed came from
another snapshot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import asyncpg


@dataclass(frozen=True)
class TableBasis:
    """What the previous run left of one table: its source table, its rows in that run's snapshot, and
    the production deletes it left on the target (found, not deleted)."""

    source: str
    rows: int
    left: int

    def missing(self, kept: int) -> int:
        """Of the rows the basis snapshot held, how many are not still there unchanged (``kept`` are)."""
        return self.rows - kept


@dataclass(frozen=True)
class Basis:
    """The previous run's snapshot and, per table, what it left (see the module's text)."""

    snapshot: str
    tables: dict[str, TableBasis]

    def of(self, name: str, source_name: str) -> TableBasis | None:
        """The table's basis, when it can settle the table: same source table, nothing left."""
        entry = self.tables.get(name)
        return entry if entry is not None and entry.source == source_name and entry.left == 0 else None


async def last_basis(tconn: asyncpg.Connection, source: str | None) -> Basis | None:
    """The basis the last run on the target left, if it read ``source``: the run before this one must be
    the last to have landed anything (a run that ended otherwise, or a retry, left none). The run's
    lock made sure ``_sync`` is there."""
    row = await tconn.fetchrow(
        "SELECT deletes_basis::text AS basis, options->>'source' AS source FROM _sync.runs "
        "ORDER BY id DESC LIMIT 1"
    )
    if row is None or row["basis"] is None or source is None or row["source"] != source:
        return None
    data = json.loads(row["basis"])
    tables = {name: TableBasis(t["source"], t["rows"], t["left"]) for name, t in data["tables"].items()}
    return Basis(data["snapshot"], tables)


async def forget_basis(conn: asyncpg.Connection) -> None:
    """Drop every recorded basis: a writer that leaves no run record of its own (``--auth-only``) is
    about to land rows from a snapshot no basis knows."""
    if await conn.fetchval("SELECT to_regclass('_sync.runs') IS NOT NULL"):
        await conn.execute("UPDATE _sync.runs SET deletes_basis = NULL WHERE deletes_basis IS NOT NULL")
