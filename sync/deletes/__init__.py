"""Production deletes: rows and users the target holds because they came from production, gone from it.

**The rule.** A target row (or user) came from production when

- the ledger says a run landed it (``_sync.landed``, and ``_sync.id_map`` for mappings older than the
  ledger: source key → target key), or
- no run landed it and it is older than the copy: its ``created_at`` (else its since-column) is before
  the copy date, the first run's ``--since``. The development copy brought it with production's key.

It is a **production delete** when production has no row with its source key (the ledger's, or for a
row from the copy its own key). Every other target row is development's: never reported, never
touched. A row without a ledger entry and without a date column (or with no copy date known) is
development's, which errs on the side of keeping.

Found in the databases, at a cost that follows how much differs (:mod:`sync.deletes.find`), and
applied (``--deletes apply|soft``) children first, set-based per table (:mod:`sync.deletes.apply`): a
row that some row not being deleted still references is kept and reported as held, so nothing
development made is cascaded away or set to NULL. Users are deleted (their identities and sessions go
with them), or with ``soft`` marked deleted as the Auth server's soft delete does: ``deleted_at`` set,
e-mail, phone and identity subjects obfuscated, password and tokens cleared, and banned.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import asyncpg

from sync.census import Tally
from sync.connect import Endpoint, connect
from sync.deletes.apply import delete_gone, held, soft_delete_gone_users
from sync.deletes.basis import Basis
from sync.deletes.find import GONE, Finder, Found
from sync.models import Model
from sync.modes import DeleteMode
from sync.plan import TablePlan
from sync.selection import key_text_sql, target_key_sql
from sync.sqltext import ident

USERS = "auth.users"


class Deletes(Model):
    """One table's (or the users') production deletes: found, and when applied, deleted or held."""

    table: str
    found: int = 0
    keys: list[str] = []
    """The first target keys found (up to five), in key order."""
    deleted: int = 0
    held: int = 0
    """Not deleted: a row that stays (development's) references them."""
    held_keys: list[str] = []
    source: str | None = None
    """The source table read."""
    source_rows: int | None = None
    """Its rows in the snapshot read."""
    counted: bool = False
    """Settled by counting the source's rows against the previous run's (no key compared)."""

    @classmethod
    def of(cls, table: str, source: str, gone: Found) -> Deletes:
        return cls(
            table=table,
            found=gone.count,
            keys=gone.keys,
            source=source,
            source_rows=gone.source_rows,
            counted=gone.counted,
        )


class DeletesReport(Model):
    """Every table's production deletes and the users', as ``sync plan``, ``run`` and ``verify`` show them."""

    mode: DeleteMode = DeleteMode.REPORT
    copy_date: datetime | None = None
    users: Deletes | None = None
    tables: list[Deletes] = []

    @property
    def found(self) -> int:
        return sum(d.found for d in self.tables) + (self.users.found if self.users else 0)

    @property
    def deleted(self) -> int:
        """Rows and users deleted (or soft-deleted) on the target."""
        return sum(d.deleted for d in self.tables) + (self.users.deleted if self.users else 0)

    def lines(self) -> list[str]:
        """One line per table (and the users) with production deletes: counts, first keys, what was done."""
        lines = []
        for d in [*([self.users] if self.users else []), *self.tables]:
            if not d.found:
                continue
            line = f"{d.table}: {d.found:,} deleted in production (first: {', '.join(d.keys)})"
            if self.mode is not DeleteMode.REPORT:
                done = "marked deleted" if self.mode is DeleteMode.SOFT and d.table == USERS else "deleted"
                line += f"; {d.deleted:,} {done} on the target"
                if d.held:
                    line += (
                        f", {d.held:,} kept because development rows reference them "
                        f"(first: {', '.join(d.held_keys)})"
                    )
            lines.append(line)
        return lines

    def basis(self, snapshot: str) -> dict[str, Any] | None:
        """What the next run settles tables by (:class:`Basis` as JSON), when every table was read."""
        every = [*([self.users] if self.users else []), *self.tables]
        if any(d.source is None or d.source_rows is None for d in every):
            return None
        tables = {
            d.table: {"source": d.source, "rows": d.source_rows, "left": d.found - self._gone(d)}
            for d in every
        }
        return {"snapshot": snapshot, "tables": tables}

    def _gone(self, d: Deletes) -> int:
        """How many of the table's production deletes left the target (soft-deleted users stay on it)."""
        return 0 if self.mode is DeleteMode.SOFT and d.table == USERS else d.deleted


async def copy_date(tconn: asyncpg.Connection) -> datetime | None:
    """The first run's ``--since``: target rows older than it came with the development copy."""
    if not await tconn.fetchval("SELECT to_regclass('_sync.runs') IS NOT NULL"):
        return None
    return await tconn.fetchval(
        "SELECT since FROM _sync.runs WHERE NOT options ? 'retry' ORDER BY id LIMIT 1"
    )


async def table_deletes(finder: Finder, tp: TablePlan, mode: DeleteMode = DeleteMode.REPORT) -> Deletes:
    """The table's production deletes, inside the finder's target transaction; deleted unless ``mode`` is
    report."""
    to_target = {c.source: c.target for c in tp.columns}
    since = to_target.get(tp.since) if tp.since else None
    dated = next((c for c in ("created_at", since) if c and c in to_target.values()), None)
    key = target_key_sql(tp, "t.")
    typed = None
    if len(tp.row_key) == 1:
        (column,) = tp.row_key
        typed = f"t.{ident(column)}", tp.target_types[column]
    gone = await finder.find(tp.name, tp.source_name, key_text_sql(tp), key, dated, typed)
    found = Deletes.of(tp.name, tp.source_name, gone)
    if mode is DeleteMode.REPORT or not found.found:
        return found
    found.deleted = await delete_gone(finder.tconn, tp.name, key, skip_schema=None)
    found.held, found.held_keys = await held(finder.tconn, tp.name, key)
    return found


async def user_deletes(finder: Finder, mode: DeleteMode = DeleteMode.REPORT) -> tuple[Deletes, set[str]]:
    """The users production deleted, inside the finder's target transaction: the report and every such id.

    Under ``apply`` they are deleted, under ``soft`` marked deleted; either way not when a row that
    stays references them (identities and other auth-schema rows do not count: they go with the user).
    """
    gone = await finder.find(USERS, USERS, "id::text", "t.id::text", "created_at", ("t.id", "uuid"))
    found = Deletes.of(USERS, USERS, gone)
    if not found.found:
        return found, set()
    ids = {r["k"] for r in await finder.tconn.fetch(f"SELECT k FROM {GONE}")}
    if mode is DeleteMode.REPORT:
        return found, ids
    if mode is DeleteMode.APPLY:
        found.deleted = await delete_gone(finder.tconn, USERS, "t.id::text", skip_schema="auth")
    else:
        found.deleted = await soft_delete_gone_users(finder.tconn)
    found.held, found.held_keys = await held(finder.tconn, USERS, "t.id::text", soft=mode is DeleteMode.SOFT)
    return found, ids


async def production_deletes(
    sconn: asyncpg.Connection,
    tconn: asyncpg.Connection,
    tables: Sequence[TablePlan],
    copied: datetime | None,
    mode: DeleteMode = DeleteMode.REPORT,
    basis: Basis | None = None,
    tallies: Mapping[str, Tally] | None = None,
    on_users: Callable[[set[str]], None] | None = None,
) -> tuple[DeletesReport, set[str]]:
    """Every table's production deletes and the users', in ``tconn``'s transaction.

    ``tables`` come parents first, as the plan orders them. Returns the report and the ids of every
    target user production deleted (the auth import must not hand such an account to anyone else);
    ``on_users`` is given those ids as soon as they are known (under ``report``, before any table).
    Under ``report`` the caller rolls the transaction back; it holds only temporary tables. ``basis``
    (the previous run's) settles by counting the tables it can, with the run's census (``tallies``)
    when it took one.
    """
    report = DeletesReport(mode=mode, copy_date=copied)
    finder = await Finder.open(sconn, tconn, copied, basis, tallies)
    users = finder.users
    gone: set[str] = set()

    async def search_users() -> None:
        nonlocal gone
        if users:
            report.users, gone = await user_deletes(finder, mode)
        if on_users is not None:
            on_users(gone)

    # Reported only, the users come first: the caller can go on once it knows them. Applied, children
    # go before their parents, and the users last.
    if mode is DeleteMode.REPORT:
        await search_users()
    for tp in reversed(tables):
        report.tables.insert(0, await table_deletes(finder, tp, mode))
    if mode is not DeleteMode.REPORT:
        await search_users()
    return report, gone


def counted(
    tables: Sequence[TablePlan], mode: DeleteMode, basis: Basis | None, tallies: Mapping[str, Tally] | None
) -> DeletesReport | None:
    """The report, when the census's counts settle every table and the users (None: some must be found)."""
    if basis is None or tallies is None or USERS not in basis.tables:
        return None
    report = DeletesReport(mode=mode)
    for name, source in [*((tp.name, tp.source_name) for tp in tables), (USERS, USERS)]:
        entry, counts = basis.of(name, source), tallies.get(name)
        if entry is None or counts is None or counts.kept is None or entry.missing(counts.kept):
            return None
        found = Deletes.of(name, source, Found(0, [], source_rows=counts.rows, counted=True))
        if name == USERS:
            report.users = found
        else:
            report.tables.append(found)
    return report


async def find_deletes(
    sconn: asyncpg.Connection,
    target: Endpoint,
    tables: Sequence[TablePlan],
    copied: datetime | None = None,
    mode: DeleteMode = DeleteMode.REPORT,
    basis: Basis | None = None,
    tallies: Mapping[str, Tally] | None = None,
    on_users: Callable[[set[str]], None] | None = None,
) -> tuple[DeletesReport, set[str]]:
    """:func:`production_deletes` on a target connection of its own; committed only when applying.

    ``copied`` defaults to the first run's ``--since`` recorded on the target. Only reported, the
    search reads the target in one snapshot, its first: writes the run makes meanwhile (its users and
    rows, once ``on_users`` was called) are not seen.
    """
    tconn = await connect(target, application_name="sync deletes")
    try:
        isolation = "repeatable_read" if mode is DeleteMode.REPORT else None
        transaction = tconn.transaction(isolation=isolation)
        await transaction.start()
        try:
            if copied is None:
                copied = await copy_date(tconn)
            found = await production_deletes(sconn, tconn, tables, copied, mode, basis, tallies, on_users)
        except BaseException:
            if not tconn.is_closed():  # a lost connection has nothing to roll back: its failure is told
                await transaction.rollback()
            raise
        if mode is DeleteMode.REPORT:
            await transaction.rollback()
        else:
            await transaction.commit()
        return found
    finally:
        await tconn.close()
