"""What a run would do, measured on the live databases: the report behind ``sync plan``.

Both databases are only read, each in one ``REPEATABLE READ READ ONLY`` transaction (a consistent
view, and a guarantee that nothing is written): their catalogs, the plan drawn from them, the cast
checks, then per table the source rows in the window and, for remapped integer keys, how many of
those keys the target already uses for another row, and how the source's users meet the target's.
Production deletes are found as the run finds them: the source's keys (read in its read-only
transaction) stream into a temporary table of a target session whose transaction is rolled back, so
nothing persists, not even in the catalog.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from sync.auth.match import MatchKind, match_users, read_id_map, read_target_keys
from sync.auth.source import read_source_keys
from sync.catalog import Catalog, Table, read_catalog
from sync.connect import Endpoint, PoolMode, connect
from sync.deletes import DeletesReport, copy_date, find_deletes
from sync.errors import PlanError, UsageError
from sync.mapping import Mapping
from sync.plan import (
    AUTH_USERS,
    PlanReport,
    TablePlan,
    TableReport,
    TriggerReport,
    UserReport,
    check_casts,
    draft_plan,
)
from sync.preflight import Needs, preflight, reach
from sync.selection import CLOSURE_PASS, Changes, Selection
from sync.snapshot import current_xids
from sync.sqltext import Params, ident
from sync.state import CATCH_UP_OVERLAP, catch_up_since, catch_up_xmin, quarantined_keys
from sync.storage.rules import storage_rules
from sync.storage.stage import survey_storage


async def preview(
    source: Endpoint, target: Endpoint, mapping: Mapping, since: datetime | None = None
) -> PlanReport:
    """Plan the copy of ``source`` into ``target`` and count what it would move; writes nothing.

    ``since`` starts the window (None: whole tables). Problems that would lose data come back in the
    report's ``errors``; unreachable databases raise ConnectError, refused reads UsageError.
    """
    source, target = await reach(source, target)
    async with AsyncExitStack() as stack:
        src = await stack.enter_async_context(_reading(source))
        tgt = await stack.enter_async_context(_reading(target))
        async with _failures_named(source):
            source_catalog = await read_catalog(src, mapping.sync.schemas)
        async with _failures_named(target):
            target_catalog = await read_catalog(tgt, mapping.sync.schemas)
        plan, problems = draft_plan(source_catalog, target_catalog, mapping)
        checked = await preflight(source, target, plan, Needs())
        catch_up = since is None
        changes = None
        if catch_up:
            async with _failures_named(target):
                since = await last_mark(tgt, checked.source_identity)
                if since is not None:
                    changes = await catch_up_changes(src, tgt, checked.source_identity)
        async with _failures_named(target):
            problems += await check_casts(tgt, plan.tables)
        tables = [TableReport.of(p) for p in plan.tables]
        users, files, since_notes, deletes = None, [], [], DeletesReport()
        try:
            rules = storage_rules(plan, mapping)
        except PlanError as exc:
            problems += exc.problems
        if not problems:
            sides = _Sessions(source, target, src, tgt, source_catalog, target_catalog)
            selection = Selection(plan, since, changes=changes)
            tables = [
                await sides.measure(report, p, selection)
                for report, p in zip(tables, plan.tables, strict=True)
            ]
            users = await sides.users()
            deletes = await sides.deletes(plan.tables, since, first=not catch_up)
            if rules:
                async with _failures_named(target):
                    files = (await survey_storage(src, tgt, rules, since=since, plan=plan)).plan_lines()
            async with _failures_named(source):
                since_notes = await unmaintained_since_columns(src, plan.tables)
        return PlanReport(
            source=str(source),
            target=str(target),
            source_version=source_catalog.server_version,
            target_version=target_catalog.server_version,
            source_pool=checked.source.pool_mode,
            target_pool=checked.target.pool_mode,
            mapping=mapping.origin,
            since=since,
            catch_up=catch_up,
            auth_mode=plan.auth_mode,
            tables=tables,
            users=users,
            auth_triggers=[TriggerReport.of(t) for t in plan.auth_triggers],
            notes=plan.notes + checked.notes,
            warnings=plan.warnings + since_notes + connection_warnings(source, target),
            errors=problems,
            files=files,
            deletes=deletes.lines(),
        )


# A BEFORE UPDATE row trigger whose function (or arguments, as moddatetime takes them) names the column.
_MAINTAINED = """
SELECT EXISTS (
    SELECT FROM pg_trigger AS t JOIN pg_proc AS f ON f.oid = t.tgfoid
    WHERE t.tgrelid = $1::regclass AND NOT t.tgisinternal AND t.tgenabled <> 'D'
      AND t.tgtype & 1 <> 0 AND t.tgtype & 2 <> 0 AND t.tgtype & 16 <> 0
      AND (position(lower($2) IN lower(f.prosrc)) > 0 OR position(convert_to($2, 'UTF8') IN t.tgargs) > 0)
)
"""


async def unmaintained_since_columns(conn: asyncpg.Connection, tables: Sequence[TablePlan]) -> list[str]:
    """A warning per table whose since-column nothing on the source keeps current.

    Catch-ups find edits by transaction id whatever the column says; the first run's window has only
    the column, so there an edit of an older row that does not move it is left out.
    """
    warnings = []
    for tp in tables:
        if tp.since is None:
            continue
        if tp.since == "created_at":
            why = "it is created_at, which edits never move"
        elif not await conn.fetchval(_MAINTAINED, tp.source_name, tp.since):
            why = "no trigger on the source sets it on update"
        else:
            continue
        warnings.append(
            f"{tp.name}: since-column {tp.since} is not maintained ({why}): the first run's window misses "
            "older rows edited since --since without touching it (catch-ups find edits by transaction); "
            "use an earlier --since, or a since-column a trigger keeps current"
        )
    return warnings


async def last_mark(conn: asyncpg.Connection, source_identity: str) -> datetime | None:
    """Where ``sync run`` without ``--since`` would start: the last successful run's mark, if any."""
    if not await conn.fetchval("SELECT to_regclass('_sync.runs') IS NOT NULL"):
        return None
    return await catch_up_since(conn, CATCH_UP_OVERLAP, source_identity)


async def catch_up_changes(
    src: asyncpg.Connection, tgt: asyncpg.Connection, source_identity: str
) -> Changes | None:
    """What a catch-up run would read besides its window, as ``sync run`` computes it: the writes of the
    transactions since the snapshot of the last run that read this source (up to this plan's), and the
    keys still in quarantine."""
    previous = await catch_up_xmin(tgt, source_identity)
    if previous is None:
        return None
    upto = (await current_xids(src)).xmax
    return Changes(previous.xmin, upto, await quarantined_keys(tgt), previous.snapshot)


def connection_warnings(source: Endpoint, target: Endpoint) -> list[str]:
    """What the kind of connection each side uses means for a run."""
    warnings = []
    if source.mode is PoolMode.TRANSACTION:
        warnings.append(
            "the source URL goes through a transaction-mode pooler (port 6543): parallel readers cannot "
            "share one snapshot, so each batch reads the source as of its own moment; use the session pooler "
            "(port 5432) or the direct URL for one consistent view"
        )
    if target.mode is PoolMode.TRANSACTION:
        warnings.append(
            "the target URL goes through a transaction-mode pooler (port 6543), which cannot hold the run "
            "lock: `sync run` needs the direct URL or the session pooler (port 5432) for --target"
        )
    return warnings


@asynccontextmanager
async def _reading(endpoint: Endpoint) -> AsyncIterator[asyncpg.Connection]:
    """A connection inside one read-only, repeatable-read transaction, rolled back and closed after."""
    conn = await connect(endpoint, application_name="sync plan")
    try:
        transaction = conn.transaction(isolation="repeatable_read", readonly=True)
        async with _failures_named(endpoint):
            await transaction.start()
        try:
            yield conn
        finally:
            if not conn.is_closed():
                await transaction.rollback()
    finally:
        await conn.close()


@asynccontextmanager
async def _failures_named(endpoint: Endpoint) -> AsyncIterator[None]:
    """Turn a database error into one line naming the side (a missing privilege, a cancelled query)."""
    try:
        yield
    except asyncpg.PostgresError as exc:
        raise UsageError(
            f"The {endpoint.side} database refused a read: {endpoint.redact(str(exc))}"
        ) from None


def _table_sql(table: Table) -> str:
    return f"{ident(table.schema)}.{ident(table.table)}"


@dataclass(frozen=True)
class _Sessions:
    """Both read-only sessions and their catalogs, for the counts that compare one side with the other."""

    source: Endpoint
    target: Endpoint
    src: asyncpg.Connection
    tgt: asyncpg.Connection
    source_catalog: Catalog
    target_catalog: Catalog

    async def measure(self, report: TableReport, plan: TablePlan, selection: Selection) -> TableReport:
        """``report`` with the source rows in the window and, for remapped keys, the collisions.

        A row whose since-column is NULL counts as in the window, as the copy reads it: an unknown
        date is no reason to leave a row behind.
        """
        table = _table_sql(self.source_catalog.tables[plan.source_name])
        source_of = {c.target: c.source for c in plan.columns}
        columns = ", ".join(ident(source_of[c]) for c in [*plan.primary_key, *plan.match_on])
        counts: list[int] = []
        keyed: list[asyncpg.Record] = []
        async with _failures_named(self.source):
            for phase in selection.phases(plan):  # the run's passes: the window, then its parents
                params = Params()
                where = phase(params)
                if plan.key != "remap":
                    counts.append(
                        await self.src.fetchval(f"SELECT count(*) FROM {table} WHERE {where}", *params.values)
                    )
                    continue
                rows = await self.src.fetch(f"SELECT {columns} FROM {table} WHERE {where}", *params.values)
                counts.append(len(rows))
                keyed += rows
        update = {
            "window_rows": counts[0],
            "parent_rows": counts[CLOSURE_PASS] if len(counts) > CLOSURE_PASS else 0,
        }
        if plan.key == "remap":
            async with _failures_named(self.target):
                update["collisions"] = await self._collisions(plan, keyed)
        return report.model_copy(update=update)

    async def _collisions(self, plan: TablePlan, keyed: Sequence[asyncpg.Record]) -> int:
        """How many of the source's (key, match_on) rows meet a target row with the key but not the rest."""
        if not keyed:
            return 0
        width = len(plan.primary_key)
        # Each key column narrowed with = ANY (the server infers the array type); tuples compared below.
        narrowing = " AND ".join(f"{ident(c)} = ANY(${i})" for i, c in enumerate(plan.primary_key, start=1))
        existing = await self.tgt.fetch(
            f"SELECT {', '.join(ident(c) for c in [*plan.primary_key, *plan.match_on])} "
            f"FROM {_table_sql(self.target_catalog.tables[plan.name])} WHERE {narrowing}",
            *([row[i] for row in keyed] for i in range(width)),
        )
        there = {tuple(r)[:width]: tuple(r)[width:] for r in existing}
        rows = [(tuple(r)[:width], tuple(r)[width:]) for r in keyed]
        return sum(1 for key, match in rows if key in there and there[key] != match)

    async def deletes(
        self, tables: Sequence[TablePlan], since: datetime | None, first: bool
    ) -> DeletesReport:
        """Production deletes per table and for users, as the run would find them.

        The copy date is the first run's ``--since``; before the first run, the one this plan is for.
        """
        async with _failures_named(self.target):
            copied = await copy_date(self.tgt) or (since if first else None)
            found, _ = await find_deletes(self.src, self.target, tables, copied)
        return found

    async def users(self) -> UserReport | None:
        """Every source user, matched to the target's by the matcher ``sync run`` uses, with its readers."""
        if AUTH_USERS not in self.source_catalog.tables or AUTH_USERS not in self.target_catalog.tables:
            return None
        async with _failures_named(self.source):
            keys = await read_source_keys(self.src)
        async with _failures_named(self.target):
            id_map = await read_id_map(self.tgt, [k.id for k in keys])
            target = await read_target_keys(self.tgt, keys, id_map)
            target_users = await self.tgt.fetchval("SELECT count(*) FROM auth.users")
        kinds = Counter(match.kind for match in match_users(keys, target, id_map))
        return UserReport(
            source=len(keys),
            target=target_users,
            matched_by_id=kinds[MatchKind.ID],
            matched_by_email=kinds[MatchKind.EMAIL],
            matched_by_phone=kinds[MatchKind.PHONE],
            to_create=kinds[MatchKind.NEW],
            set_aside=kinds[MatchKind.QUARANTINED],
        )
