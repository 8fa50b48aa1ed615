"""A catch-up's census: one count per source table, in the run's snapshot, before anything is read.

Each table (and the users and their identities) is scanned once, counting its rows, the rows in the
run's window (:meth:`Selection.in_window`: in the since-column window, changed since the previous
run's snapshot, or held in quarantine) and, when the previous run left a basis for it, the rows that
run's snapshot saw (what :mod:`sync.deletes` proves no production delete by). A table with no row in
its window whose children (through every foreign key, recursively) have none either is **quiet**: the
run reads nothing of it, so a catch-up costs these scans and what changed, not every table's passes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg

from sync.auth.columns import IDENTITIES_TABLE, USERS_TABLE, table_columns
from sync.auth.source import changed_users
from sync.plan import Plan
from sync.selection import Changes, Selection, key_text_sql, links
from sync.snapshot import SourceSnapshot
from sync.sqltext import Params, ident, table_ident

if TYPE_CHECKING:
    from sync.deletes.basis import Basis

READERS = 2
"""Source connections the census scans on at once."""
LISTED = 10_000
"""At most this many keys of rows changed since the basis snapshot are listed (see :mod:`sync.deletes`)."""

Job = tuple[str, str, dict[str, str], Params, dict[str, tuple[str, str]]]
"""One count: the table's name in the census, the source table, the conditions counted, their values."""


@dataclass(frozen=True)
class Tally:
    """One source table's counts in the run's snapshot."""

    rows: int
    window: int | None = None
    """Rows the run's window selects."""
    kept: int | None = None
    """Rows the basis snapshot saw (None: the table has no basis)."""
    changed: list[str] | None = None
    """The keys of the other rows (those it did not see), when there are at most :data:`LISTED`."""
    keyed: list[str] | None = None
    """The keys of the rows in the window, when there are at most :data:`LISTED` (a catch-up's tables
    with a one-column key)."""


@dataclass(frozen=True)
class Census:
    tallies: dict[str, Tally]
    """By target table name (``auth.users`` for the users, their window counting changed identities)."""
    quiet: frozenset[str]

    @property
    def keyed(self) -> dict[str, list[str]]:
        """The tables whose window rows were listed, with their keys."""
        return {name: t.keyed for name, t in self.tallies.items() if t.keyed is not None}


async def tally(
    conn: asyncpg.Connection,
    table: str,
    conditions: Mapping[str, str],
    params: Params,
    listed: Mapping[str, tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """``count(*)`` of ``table`` as ``rows``, and of its rows meeting each condition, in one scan. Each of
    ``listed`` (name → key SQL, condition) gives the keys of the rows meeting it (None past
    :data:`LISTED`) and their number as ``n_<name>``: its condition is evaluated once per row."""
    counted = [f"count(*) FILTER (WHERE {sql}) AS {ident(name)}" for name, sql in conditions.items()]
    gathered = [
        f"array_agg({key}) FILTER (WHERE {sql}) AS {ident(name)}"
        for name, (key, sql) in (listed or {}).items()
    ]
    inner = ", ".join(["count(*) AS rows", *counted, *gathered])
    outer = ", ".join(
        [
            "rows",
            *(ident(name) for name in conditions),
            *(
                f"cardinality({ident(n)}) AS {ident(f'n_{n}')}, {ident(n)}[1:{LISTED + 1}] AS {ident(n)}"
                for n in listed or {}
            ),
        ]
    )
    row = dict(
        await conn.fetchrow(
            f"SELECT {outer} FROM (SELECT {inner} FROM {table_ident(table)}) AS q", *params.values
        )
    )
    for name in listed or {}:
        row[f"n_{name}"] = row[f"n_{name}"] or 0
        keys = row[name] or []
        row[name] = keys if len(keys) <= LISTED else None
    return row


def changed_since(settled: Changes, key: str, params: Params) -> dict[str, tuple[str, str]]:
    """:func:`tally`'s ``listed`` for the rows ``settled``'s first snapshot did not see (``changed``)."""
    return {"changed": (key, settled.sql(params))}


def tallied(row: dict[str, Any]) -> Tally:
    """A :class:`Tally` of what :func:`tally` found (``window`` or ``keyed``, ``changed``)."""
    window = row["n_keyed"] if "n_keyed" in row else row.get("window")
    kept = row["rows"] - row["n_changed"] if "n_changed" in row else None
    return Tally(row["rows"], window, kept, row.get("changed"), row.get("keyed"))


def quiet_tables(plan: Plan, window: Mapping[str, int]) -> frozenset[str]:
    """The tables with no row in their window and no child that has one, however far down."""
    parents = {tp.name: {link.parent for link in links(tp)} for tp in plan.tables}
    busy = [name for name, n in window.items() if n != 0]
    needed = set(busy)
    while busy:
        for parent in parents.get(busy.pop(), ()):
            if parent not in needed:
                needed.add(parent)
                busy.append(parent)
    return frozenset(name for name in window if name not in needed)


async def take_census(
    snapshot: SourceSnapshot,
    plan: Plan,
    selection: Selection,
    users_since: datetime | None,
    basis: Basis | None,
    users_changed: Callable[[], object] | None = None,
) -> Census:
    """Count every planned table (and the users, when ``users_since`` is set) in the run's snapshot,
    and the rows ``basis`` (the previous run's) saw of each table it can settle. ``users_changed`` is
    called once, as soon as the users' count or their identities' count finds a user changed, whichever
    comes first (the other tables, and maybe the other of the two, still being counted)."""
    settled = Changes.since_snapshot(basis.snapshot, snapshot.xids.xmax) if basis and snapshot.xids else None
    jobs: list[Job] = []
    for tp in plan.tables:
        params = Params()
        window = selection.in_window(tp, params)
        conditions, listed = {"window": window}, {}
        if selection.changes is not None and len(tp.row_key) == 1:
            conditions, listed = {}, {"keyed": (key_text_sql(tp), window)}
        if settled is not None and basis.of(tp.name, tp.source_name):
            listed.update(changed_since(settled, key_text_sql(tp), params))
        jobs.append((tp.name, tp.source_name, conditions, params, listed))
    counts: dict[str, dict[str, int]] = {}
    opened = await asyncio.gather(*(snapshot.reader() for _ in range(READERS)), return_exceptions=True)
    readers = [conn for conn in opened if isinstance(conn, asyncpg.Connection)]
    try:
        for failed in opened:
            if isinstance(failed, BaseException):
                raise failed
        users: list[Job] = []
        if users_since is not None:
            kept = settled if basis and basis.of(USERS_TABLE, USERS_TABLE) else None
            # The users' columns on one reader, every table's size on the other, at once.
            names = [*(job[1] for job in jobs), USERS_TABLE, IDENTITIES_TABLE]
            users, pages = await asyncio.gather(
                _user_jobs(readers[0], selection.changes, users_since, kept), _pages(readers[-1], names)
            )
        else:
            pages = await _pages(readers[0], [job[1] for job in jobs])
        queue = sorted([*jobs, *users], key=lambda job: -pages.get(table_ident(job[1]), 0))
        unheard = [users_changed] if users_changed is not None else []
        user_jobs = {job[0] for job in users}

        async def scan(conn: asyncpg.Connection) -> None:
            while queue:
                name, table, conditions, params, listed = queue.pop(0)
                counts[name] = await tally(conn, table, conditions, params, listed)
                if name in user_jobs and counts[name]["n_keyed"] and unheard:
                    unheard.pop()()  # the first count that finds a user changed: the other is not awaited

        async with asyncio.TaskGroup() as group:
            for conn in readers:
                group.create_task(scan(conn))
    except BaseException:
        for conn in readers:
            conn.terminate()
        raise
    for conn in readers:
        snapshot.give_back(conn)  # the next stage reads in the same snapshot
    if IDENTITIES_TABLE in counts:
        # A user is in the window when its row or one of its identities is: counted (and listed) once.
        touched = counts.pop(IDENTITIES_TABLE)
        users = counts[USERS_TABLE]
        users["n_keyed"] += touched["n_keyed"]
        if users["keyed"] is not None and touched["keyed"] is not None:
            ids = sorted({*users["keyed"], *touched["keyed"]})
            users["keyed"] = ids if len(ids) <= LISTED else None
        else:
            users["keyed"] = None
    tallies = {name: tallied(c) for name, c in counts.items()}
    quiet = quiet_tables(plan, {name: t.window for name, t in tallies.items()})
    return Census(tallies, quiet)


async def _pages(conn: asyncpg.Connection, tables: list[str]) -> dict[str, int]:
    """Each table's size on disk (by its quoted name): the largest are counted first, so the readers
    end together."""
    return dict(
        await conn.fetch(
            "SELECT t, coalesce(pg_relation_size(to_regclass(t)), 0) FROM unnest($1::text[]) AS t",
            [table_ident(table) for table in tables],
        )
    )


async def _user_jobs(
    conn: asyncpg.Connection,
    changes: Changes | None,
    since: datetime,
    settled: Changes | None,
) -> list[Job]:
    """The users' and identities' counts: the users a catch-up's auth stage reads, and those kept."""
    params = Params()
    users, _ = changed_users(await table_columns(conn, USERS_TABLE), since, changes, params)
    conditions, listed = {}, {"keyed": ("id::text", users)}
    if settled is not None:
        listed.update(changed_since(settled, "id::text", params))
    jobs: list[Job] = [(USERS_TABLE, USERS_TABLE, conditions, params, listed)]
    if changes is not None:
        touched = Params()
        identities = changes.sql(touched)
        listed = {"keyed": ("user_id::text", identities)}
        jobs.append((IDENTITIES_TABLE, IDENTITIES_TABLE, {}, touched, listed))
    return jobs
