"""Copy one table's rows from source to target: batched, key-remapped, upserted, checkpointed.

A batch is a key range of the source table in the run's window (since-column ≥ since, plus the
parents that in-window rows need: the closure). Each batch is ONE target transaction:

1. stage: the source streams ``COPY (SELECT …) TO STDOUT (FORMAT binary)`` straight into a
   ``COPY … FROM STDIN`` of a temporary table typed like the source columns: rows are never decoded
   in Python on this path;
2. rewrite foreign keys through ``_sync.id_map`` (users matched by e-mail, remapped parents);
3. give the table's own rows their target keys (``remap``: a key taken in target by a different row
   gets a fresh key from the target's sequence, and the pair goes to the id map; ``natural``: adopt
   the key of the target row with the same natural key);
4. upsert per the table's policy, touching only copied columns and only rows that differ;
5. advance the table's checkpoint.

Data and checkpoint commit together, so a crash never loses or duplicates a batch. A batch the
target rejects for data reasons is split until the bad rows are isolated; they go to
``_sync.quarantine`` with the database's message and the rest lands.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import asyncpg

from sync.connect import Endpoint, connect
from sync.errors import first_line
from sync.plan import ParentLink, Plan, TablePlan
from sync.retry import is_transient_db_error, retrying
from sync.snapshot import SourceSnapshot
from sync.sqltext import column_list, ident, literal, row_of, table_ident

log = logging.getLogger("sync")

STAGE = "_sync_stage"
# SQLSTATE classes that mean "this row is wrong for the target", not "the run is broken".
DATA_ERROR_CLASSES = ("21", "22", "23", "2F", "39", "P0")

Progress = Callable[[str, int], None]


@dataclass
class TableResult:
    """What one table's copy did."""

    table: str
    read: int = 0
    inserted: int = 0
    updated: int = 0
    quarantined: int = 0
    remapped: int = 0
    batches: int = 0
    retries: int = 0
    seconds: float = 0.0

    @property
    def written(self) -> int:
        return self.inserted + self.updated


@dataclass(frozen=True)
class Position:
    """Where a table's copy stands: the pass (window, then closure) and the last source key done."""

    phase: int
    key: list[str] | None


@dataclass
class Written:
    """Rows one committed transaction wrote."""

    inserted: int = 0
    updated: int = 0
    remapped: int = 0


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


class RowRejected(Exception):
    """A data error that concerns rows, not the run: the batch is split to find the rows."""

    def __init__(self, message: str, sqlstate: str | None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def is_data_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the target refusing row data (constraint, cast, trigger), not a failure."""
    if isinstance(exc, RowRejected):
        return True
    state = getattr(exc, "sqlstate", None) or ""
    return isinstance(exc, asyncpg.PostgresError) and state[:2] in DATA_ERROR_CLASSES


def _links(tp: TablePlan) -> list[ParentLink]:
    """Every foreign key of the table once (deferred links are among the parents too)."""
    return list(dict.fromkeys([*tp.parents, *tp.deferred]))


def key_text_sql(tp: TablePlan, alias: str = "") -> str:
    """SQL (over the source table) giving a row's key as one text value, as the id map stores it."""
    cols = source_key_columns(tp)
    if len(cols) == 1:
        return f"{alias}{ident(cols[0])}::text"
    return f"jsonb_build_array({column_list(cols, alias)})::text"


def source_key_columns(tp: TablePlan) -> list[str]:
    by_target = {c.target: c.source for c in tp.columns}
    return [by_target[k] for k in tp.primary_key]


def _source_types(tp: TablePlan) -> dict[str, str]:
    return {c.source: c.source_type for c in tp.columns}


class SelectionSql:
    """The SQL that picks a table's rows for the run: the window, and the closure of its children."""

    def __init__(
        self, plan: Plan, since: datetime | None, only_keys: dict[str, list[str]] | None = None
    ) -> None:
        self.plan = plan
        self.since = since
        self.only_keys = only_keys

    def in_window(self, tp: TablePlan, alias: str = "") -> str:
        """True for rows whose since-column is in the window (NULL since-columns count as in it)."""
        if self.only_keys is not None or self.since is None or tp.since is None:
            return "true"
        col = f"{alias}{ident(tp.since)}"
        return f"({col} >= {literal(self.since.isoformat())}::timestamptz OR {col} IS NULL)"

    def selected(self, tp: TablePlan, alias: str = "", seen: frozenset[str] = frozenset()) -> str:
        """In the window, or referenced by a selected child row (the closure), recursively."""
        if self.only_keys is not None:
            keys = ", ".join(literal(k) for k in self.only_keys.get(tp.name, []))
            return f"({key_text_sql(tp, alias)} = ANY(ARRAY[{keys}]::text[]))"
        window = self.in_window(tp, alias)
        if window == "true":
            return "true"
        referenced = self.referenced(tp, alias, seen)
        return f"({window} OR {referenced})" if referenced else window

    def referenced(self, tp: TablePlan, alias: str = "", seen: frozenset[str] = frozenset()) -> str | None:
        """Rows of ``tp`` that some selected child row points at; None when no copied table points here.

        Children are gathered per referenced column set into one ``IN (… UNION ALL …)``, which the
        planner runs as one hashed lookup per query instead of one per child.
        """
        seen = seen | {tp.name}
        parent_by_target = {c.target: c.source for c in tp.columns}
        branches: dict[tuple[str, ...], list[str]] = {}
        for child in self.plan.tables:
            if child.name in seen:
                continue
            child_by_target = {c.target: c.source for c in child.columns}
            for link in _links(child):
                if link.parent != tp.name:
                    continue
                fk = [child_by_target[c] for c in link.columns if c in child_by_target]
                pk = tuple(parent_by_target[c] for c in link.parent_columns if c in parent_by_target)
                if len(fk) != len(link.columns) or len(pk) != len(link.parent_columns):
                    continue
                inner = self.selected(child, "c.", seen)
                branches.setdefault(pk, []).append(
                    f"SELECT {column_list(fk, 'c.')} FROM {table_ident(child.source_name)} AS c WHERE {inner}"
                )
        clauses = []
        for pk, selects in branches.items():
            left = column_list(pk, alias) if len(pk) == 1 else f"({column_list(pk, alias)})"
            clauses.append(f"{left} IN ({' UNION ALL '.join(selects)})")
        return "(" + " OR ".join(clauses) + ")" if clauses else None

    def phases(self, tp: TablePlan) -> list[str]:
        """The table's selection as passes over its key range: the window first, then the closure.

        Keeping the closure out of the window pass keeps each window batch a plain range scan; the
        closure pass then reads only out-of-window rows that a child needs (usually few).
        """
        selected = self.selected(tp)
        if self.only_keys is not None or selected == "true":
            return [selected]
        window = self.in_window(tp)
        referenced = self.referenced(tp)
        return [window] if referenced is None else [window, f"NOT {window} AND {referenced}"]


class TableCopy:
    """The copy of one table, batch by batch from its checkpoint."""

    def __init__(self, ctx: CopyContext, tp: TablePlan) -> None:
        self.ctx = ctx
        self.tp = tp
        self.result = TableResult(tp.name)
        self.checkpoint_name = tp.name
        self.selection = SelectionSql(ctx.plan, ctx.since, ctx.only_keys)
        self.source_pk = source_key_columns(tp)
        self.src_types = _source_types(tp)
        self.stage_columns = [c.target for c in tp.columns]
        self.binary = True
        self.predicate = "true"
        self._sconn: asyncpg.Connection | None = None
        self._tconn: asyncpg.Connection | None = None

    # -------------------------------------------------------------------------------- lifecycle

    async def run(self) -> TableResult:
        """Copy every selected row after the checkpoint, pass by pass; return the counts."""
        started = time.perf_counter()
        try:
            await self._connect()
            start, done = await self._load_checkpoint()
            if done:
                return self.result
            self._report(0)
            await self._prepare()
            if getattr(self.ctx.progress, "wants_totals", False):
                total = await self._with_retries(self._count_selected)
                self.ctx.progress.total(self.tp.name, total)  # type: ignore[union-attr]
            for phase, predicate in enumerate(self.selection.phases(self.tp)):
                if phase < start.phase:
                    continue
                self.predicate = predicate
                last_key = start.key if phase == start.phase else None
                while True:
                    boundary = await self._with_retries(lambda lk=last_key: self._next_boundary(lk))
                    # The last batch of a pass records the start of the next one.
                    after = Position(phase, boundary) if boundary is not None else Position(phase + 1, None)
                    await self._with_retries(
                        lambda lk=last_key, b=boundary, a=after: self._copy_range(lk, b, a)
                    )
                    if boundary is None:
                        break
                    last_key = boundary
            await self._with_retries(self._mark_done)
        finally:
            self.result.seconds = time.perf_counter() - started
            await self._close()
        return self.result

    async def _connect(self) -> None:
        await self._close()
        self._tconn = await connect(self.ctx.target, application_name=f"sync {self.tp.name}")
        self._sconn = await self.ctx.source.reader()

    async def _close(self) -> None:
        for conn in (self._sconn, self._tconn):
            if conn is not None and not conn.is_closed():
                conn.terminate()
        self._sconn = self._tconn = None

    async def _with_retries(self, step: Callable[[], Awaitable[Any]]) -> Any:
        async def attempt() -> Any:
            lost = [
                side
                for side, conn in (("source", self._sconn), ("target", self._tconn))
                if conn is not None and conn.is_closed()
            ]
            if lost:
                # The driver saw the connection drop between statements: a retry like any other.
                self.result.retries += 1
                log.warning("%s: %s connection lost; reconnecting", self.tp.name, " and ".join(lost))
            if lost or self._tconn is None or self._sconn is None:
                await self._connect()
            try:
                return await step()
            except BaseException as exc:
                if is_transient_db_error(exc):
                    self.result.retries += 1
                    await self._close()
                raise

        return await retrying(what=f"copy of {self.tp.name}")(attempt)

    @property
    def sconn(self) -> asyncpg.Connection:
        assert self._sconn is not None
        return self._sconn

    @property
    def tconn(self) -> asyncpg.Connection:
        assert self._tconn is not None
        return self._tconn

    # ------------------------------------------------------------------------------ checkpoints

    async def _load_checkpoint(self) -> tuple[Position, bool]:
        row = await self.tconn.fetchrow(
            "SELECT last_key, done, rows_done FROM _sync.checkpoints WHERE run_id = $1 AND table_name = $2",
            self.ctx.run_id,
            self.checkpoint_name,
        )
        if row is None or not row["last_key"]:
            return Position(0, None), bool(row and row["done"])
        saved = json.loads(row["last_key"])
        return Position(saved["pass"], saved["key"]), row["done"]

    async def _mark_done(self) -> None:
        await self.tconn.execute(
            "INSERT INTO _sync.checkpoints (run_id, table_name, done) VALUES ($1, $2, true) "
            "ON CONFLICT (run_id, table_name) DO UPDATE SET done = true, updated_at = now()",
            self.ctx.run_id,
            self.checkpoint_name,
        )

    async def _advance_checkpoint(self, position: Position, rows: int) -> None:
        await self.tconn.execute(
            "INSERT INTO _sync.checkpoints (run_id, table_name, last_key, rows_done) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (run_id, table_name) DO UPDATE SET last_key = EXCLUDED.last_key, "
            "rows_done = _sync.checkpoints.rows_done + EXCLUDED.rows_done, updated_at = now()",
            self.ctx.run_id,
            self.checkpoint_name,
            json.dumps({"pass": position.phase, "key": position.key}),
            rows,
        )

    # ---------------------------------------------------------------------------------- preparing

    async def _prepare(self) -> None:
        """Decide the staging format, and move a remap table's sequence past every source key."""
        missing = await self.tconn.fetch(
            "SELECT t FROM unnest($1::text[]) AS t WHERE to_regtype(t) IS NULL",
            sorted(set(self.src_types.values())),
        )
        # Binary COPY needs the same type on both ends; a source type unknown to the target goes as text.
        self.unknown_types = {r["t"] for r in missing}
        self.binary = not self.unknown_types
        if self.tp.key == "remap" and len(self.tp.primary_key) == 1:
            await self._with_retries(self._advance_sequence_for_remap)

    async def _advance_sequence_for_remap(self) -> None:
        key = self.tp.primary_key[0]
        sequence = self.tp.sequences.get(key)
        if sequence is None:
            return
        source_max = await self.sconn.fetchval(
            f"SELECT max({ident(self.source_pk[0])})::text FROM {table_ident(self.tp.source_name)}"
        )
        if source_max is None:
            return
        await advance_sequence(
            self.tconn,
            sequence,
            f"GREATEST({literal(source_max)}::bigint, "
            f"(SELECT max({ident(key)}) FROM {table_ident(self.tp.name)}))",
        )

    # ---------------------------------------------------------------------------------- reading

    def _range_predicate(self, after: list[str] | None, upto: list[str] | None) -> str:
        parts = [self.predicate]
        keys = row_of(self.source_pk)
        if after is not None:
            parts.append(f"{keys} > {self._key_literal(after)}")
        if upto is not None:
            parts.append(f"{keys} <= {self._key_literal(upto)}")
        return " AND ".join(parts)

    def _key_literal(self, values: Sequence[str]) -> str:
        items = [f"{literal(v)}::{self.src_types[c]}" for c, v in zip(self.source_pk, values, strict=True)]
        return f"ROW({', '.join(items)})"

    async def _count_selected(self) -> int:
        """The rows this table's copy will read (for progress bars and their ETA)."""
        return int(
            await self.sconn.fetchval(
                f"SELECT count(*) FROM {table_ident(self.tp.source_name)} "
                f"WHERE {self.selection.selected(self.tp)}"
            )
        )

    async def _next_boundary(self, after: list[str] | None) -> list[str] | None:
        """The last key of the next batch, or None when the rest fits in one batch."""
        texts = ", ".join(f"{ident(c)}::text" for c in self.source_pk)
        row = await self.sconn.fetchrow(
            f"SELECT {texts} FROM {table_ident(self.tp.source_name)} "
            f"WHERE {self._range_predicate(after, None)} "
            f"ORDER BY {column_list(self.source_pk)} OFFSET {self.ctx.batch_size - 1} LIMIT 1"
        )
        return list(row.values()) if row is not None else None

    def _select_sql(self, after: list[str] | None, upto: list[str] | None) -> str:
        cols = []
        for c in self.tp.columns:
            expr = ident(c.source)
            if c.source_type in self.unknown_types:
                expr = f"{expr}::text"
            cols.append(expr)
        return (
            f"SELECT {', '.join(cols)}, {self.selection.in_window(self.tp)} AS _in_window, "
            f"{key_text_sql(self.tp)} AS _source_key FROM {table_ident(self.tp.source_name)} "
            f"WHERE {self._range_predicate(after, upto)} ORDER BY {column_list(self.source_pk)}"
        )

    # ---------------------------------------------------------------------------------- writing

    async def _copy_range(self, after: list[str] | None, upto: list[str] | None, position: Position) -> None:
        """Copy the rows in (after, upto]; split and quarantine if the target refuses some."""
        try:
            async with self.tconn.transaction():
                count = await self._stage_stream(after, upto)
                written = await self._apply(count)
                await self._advance_checkpoint(position, count)
            self._count(written)
            self.result.batches += 1
            self._report(count)
        except Exception as exc:
            if not is_data_error(exc):
                raise
            log.info("%s: batch refused (%s); isolating the rows", self.tp.name, first_line(exc))
            records = await self.sconn.fetch(self._select_sql(after, upto))
            await self._apply_split(list(records))
            async with self.tconn.transaction():
                await self._advance_checkpoint(position, len(records))
            self.result.batches += 1
            self._report(len(records))

    def _count(self, written: Written) -> None:
        """Add a committed transaction's counts (never those of one that rolled back)."""
        self.result.inserted += written.inserted
        self.result.updated += written.updated
        self.result.remapped += written.remapped

    def _report(self, rows: int) -> None:
        self.result.read += rows
        if self.ctx.progress is not None:
            self.ctx.progress(self.tp.name, rows)

    async def _create_stage(self) -> None:
        cols = []
        for c in self.tp.columns:
            typ = "text" if c.source_type in self.unknown_types else c.source_type
            cols.append(f"{ident(c.target)} {typ}")
        await self.tconn.execute(
            f"CREATE TEMP TABLE {STAGE} ({', '.join(cols)}, _in_window boolean, _source_key text, "
            f"_mapped boolean NOT NULL DEFAULT false) ON COMMIT DROP"
        )

    async def _stage_stream(self, after: list[str] | None, upto: list[str] | None) -> int:
        """Stream the source's COPY output into the stage table; return the rows staged."""
        await self._create_stage()
        fmt = "binary" if self.binary else "text"
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=16)

        async def sink(chunk: bytes) -> None:
            await queue.put(bytes(chunk))

        ended = False

        async def chunks():  # type: ignore[no-untyped-def]
            nonlocal ended
            while (chunk := await queue.get()) is not None:
                yield chunk
            ended = True

        async def produce() -> None:
            try:
                await self.sconn.copy_from_query(self._select_sql(after, upto), output=sink, format=fmt)
            finally:
                await queue.put(None)

        # Both ends finish before anything is raised: a rollback while one connection is still inside
        # its COPY fails with "another operation is in progress" and would hide the real (retryable)
        # error. If the load fails, the source's COPY is drained so that connection stays usable.
        producer = asyncio.create_task(produce())
        columns = [*self.stage_columns, "_in_window", "_source_key"]
        try:
            status = await self.tconn.copy_to_table(STAGE, source=chunks(), columns=columns, format=fmt)
        finally:
            while not ended and await queue.get() is not None:
                pass
            await producer
        return int(status.split()[-1])

    async def _stage_records(self, records: Sequence[asyncpg.Record]) -> None:
        await self._create_stage()
        columns = [*self.stage_columns, "_in_window", "_source_key"]
        await self.tconn.copy_records_to_table(STAGE, records=[tuple(r) for r in records], columns=columns)

    async def _apply_split(self, records: list[asyncpg.Record]) -> None:
        """Land what the target accepts, halving the rows until each refusal is one row."""
        if not records:
            return
        try:
            async with self.tconn.transaction():
                await self._stage_records(records)
                written = await self._apply(len(records))
            self._count(written)
        except Exception as exc:
            if not is_data_error(exc):
                raise
            if len(records) == 1:
                await self._quarantine(records[0], exc)
                return
            middle = len(records) // 2
            await self._apply_split(records[:middle])
            await self._apply_split(records[middle:])

    async def _quarantine(self, record: asyncpg.Record, exc: BaseException) -> None:
        row = {k: v for k, v in dict(record).items() if not k.startswith("_")}
        await self.tconn.execute(
            "INSERT INTO _sync.quarantine (run_id, table_name, source_key, row_data, error, sqlstate) "
            "VALUES ($1, $2, $3, $4::jsonb, $5, $6) "
            "ON CONFLICT (table_name, source_key) WHERE resolved_at IS NULL DO UPDATE SET "
            "run_id = EXCLUDED.run_id, row_data = EXCLUDED.row_data, error = EXCLUDED.error, "
            "sqlstate = EXCLUDED.sqlstate, created_at = now()",
            self.ctx.run_id,
            self.tp.name,
            record["_source_key"],
            json.dumps(row, default=str),
            first_line(exc),
            getattr(exc, "sqlstate", None),
        )
        self.result.quarantined += 1
        log.warning("%s: row %s quarantined: %s", self.tp.name, record["_source_key"], first_line(exc))

    async def _apply(self, staged: int) -> Written:
        """Steps 2–4 on the staged rows, inside the caller's transaction."""
        written = Written()
        if staged == 0:
            return written
        if self.tp.trigger_mode == "skip":
            await self.tconn.execute("SET LOCAL session_replication_role = replica")
        for statement in rewrite_parents_sql(self.tp, self.ctx.plan):
            await self.tconn.execute(statement)
        if self.tp.key == "remap" and len(self.tp.primary_key) == 1:
            written.remapped = await remap_keys(self.tconn, self.tp, self.ctx.run_id)
        elif self.tp.key == "natural" and self.tp.natural:
            await self.tconn.execute(adopt_natural_keys_sql(self.tp), self.ctx.run_id)
        if self.tp.trigger_mode == "skip":
            await self._check_references()
        written.inserted, written.updated = await self.tconn.fetchrow(upsert_sql(self.tp))
        await self.tconn.execute(
            f"UPDATE _sync.quarantine SET resolved_at = now() WHERE table_name = $1 AND resolved_at IS NULL "
            f"AND source_key IN (SELECT _source_key FROM {STAGE})",
            self.tp.name,
        )
        return written

    async def _check_references(self) -> None:
        """With FK triggers off (triggers = "skip"), refuse rows whose parent is missing, as FKs would."""
        deferred = set(self.tp.deferred)
        for link in self.tp.parents:
            if link in deferred:
                continue
            present = " AND ".join(f"s.{ident(c)} IS NOT NULL" for c in link.columns)
            missing = await self.tconn.fetchval(
                f"SELECT s._source_key FROM {STAGE} AS s WHERE {present} "
                f"AND NOT EXISTS (SELECT 1 FROM {table_ident(link.parent)} AS p "
                f"WHERE {row_of(link.parent_columns, 'p.')} = {row_of(link.columns, 's.')}) LIMIT 1"
            )
            if missing is not None:
                raise RowRejected(
                    f"insert or update on table {self.tp.name} violates foreign key to {link.parent}: "
                    f"the referenced row is missing",
                    "23503",
                )


class DeferredPatch(TableCopy):
    """The second pass of a cycle: fill the FK columns that the first pass inserted as NULL."""

    def __init__(self, ctx: CopyContext, tp: TablePlan) -> None:
        keep = set(tp.primary_key) | {c for link in tp.deferred for c in link.columns}
        narrow = replace(
            tp,
            key="preserve",
            columns=[c for c in tp.columns if c.target in keep],
            parents=list(tp.deferred),
            deferred=[],
            target_only={},
        )
        super().__init__(ctx, narrow)
        self.checkpoint_name = f"{tp.name} (second pass)"

    async def _apply(self, staged: int) -> Written:
        if staged == 0:
            return Written()
        for statement in rewrite_parents_sql(self.tp, self.ctx.plan):
            await self.tconn.execute(statement)
        pk = self.tp.primary_key
        if len(pk) == 1:
            await self.tconn.execute(own_keys_from_map_sql(self.tp), self.tp.name)
        fks = [c for link in self.tp.parents for c in link.columns]
        target_types = self.tp.target_types
        sets = ", ".join(f"{ident(c)} = s.{ident(c)}::{target_types[c]}" for c in fks)
        status = await self.tconn.execute(
            f"UPDATE {table_ident(self.tp.name)} AS t SET {sets} FROM {STAGE} AS s "
            f"WHERE {row_of(pk, 't.')} = {staged_as_target(self.tp, pk)} "
            f"AND {row_of(fks, 't.')} IS DISTINCT FROM {staged_as_target(self.tp, fks)}"
        )
        return Written(updated=int(status.split()[-1]))


# ------------------------------------------------------------------------------------------ SQL


def key_owners(plan: Plan, table: str) -> list[str]:
    """The tables whose id map entries apply to ``table``'s keys.

    A table whose primary key is also a foreign key (``profiles.id`` → ``auth.users.id``) has no keys
    of its own: a user mapped to another id takes its profile along, and so every row pointing at the
    profile must follow the user's mapping too.
    """
    owners, seen = [table], {table}
    by_name = {t.name: t for t in plan.tables}
    while (tp := by_name.get(owners[-1])) is not None:
        parent = next(
            (
                link.parent
                for link in tp.parents
                if link.columns == tp.primary_key and link.parent not in seen
            ),
            None,
        )
        if parent is None:
            break
        owners.append(parent)
        seen.add(parent)
    return owners


def staged_as_target(tp: TablePlan, columns: Sequence[str]) -> str:
    """``ROW(s.a::type, …)``: staged columns cast to the target's types, to compare with target rows."""
    types = tp.target_types
    return "ROW(" + ", ".join(f"s.{ident(c)}::{types[c]}" for c in columns) + ")"


def own_keys_from_map_sql(tp: TablePlan) -> str:
    """Rewrite staged keys that an earlier batch or run mapped (single-column keys; $1 = the table)."""
    key = tp.primary_key[0]
    return (
        f"UPDATE {STAGE} AS s SET {ident(key)} = m.target_key::{tp.staged_types[key]}, _mapped = true "
        f"FROM _sync.id_map AS m WHERE m.table_name = $1 AND m.source_key = s._source_key"
    )


def rewrite_parents_sql(tp: TablePlan, plan: Plan) -> list[str]:
    """UPDATEs that rewrite each single-column foreign key of the stage through the id map."""
    types = tp.staged_types
    statements = []
    for link in _links(tp):
        if len(link.columns) != 1:
            continue
        col = link.columns[0]
        if col not in types:
            continue
        owners = ", ".join(literal(t) for t in key_owners(plan, link.parent))
        statements.append(
            f"UPDATE {STAGE} AS s SET {ident(col)} = m.target_key::{types[col]} FROM _sync.id_map AS m "
            f"WHERE m.table_name IN ({owners}) AND m.source_key = s.{ident(col)}::text"
        )
    return statements


async def remap_keys(conn: asyncpg.Connection, tp: TablePlan, run_id: int) -> int:
    """Give staged rows their target keys; return how many new collisions were remapped."""
    key = tp.primary_key[0]
    target_types = tp.target_types
    await conn.execute(own_keys_from_map_sql(tp), tp.name)
    sequence = tp.sequences.get(key)
    match_on = [c for c in tp.match_on if c in target_types]
    if not match_on:
        return 0
    new_key = (
        f"nextval({literal(sequence)}::regclass)"
        if sequence
        else f"(SELECT coalesce(max({ident(key)}), 0) FROM {table_ident(tp.name)}) + row_number() OVER ()"
    )
    target_row = row_of(match_on, "t.")
    staged_row = staged_as_target(tp, match_on)
    return int(
        await conn.fetchval(
            f"WITH taken AS ("
            f"  SELECT s._source_key FROM {STAGE} AS s JOIN {table_ident(tp.name)} AS t "
            f"  ON t.{ident(key)} = s.{ident(key)}::{target_types[key]} "
            f"  WHERE NOT s._mapped AND {target_row} IS DISTINCT FROM {staged_row}"
            f"), fresh AS (SELECT _source_key, {new_key} AS new_key FROM taken), "
            f"moved AS (UPDATE {STAGE} AS s SET {ident(key)} = fresh.new_key, _mapped = true FROM fresh "
            f"  WHERE s._source_key = fresh._source_key RETURNING s._source_key, s.{ident(key)} AS k), "
            f"mapped AS (INSERT INTO _sync.id_map (table_name, source_key, target_key, reason, run_id) "
            f"  SELECT $1, _source_key, k::text, 'collision', $2 FROM moved RETURNING 1) "
            f"SELECT count(*) FROM mapped",
            tp.name,
            run_id,
        )
    )


def adopt_natural_keys_sql(tp: TablePlan) -> str:
    """Rewrite staged keys to those of target rows with the same natural key, recording the pairs."""
    types = tp.staged_types
    pk = tp.primary_key
    natural = [c for c in tp.natural if c in types]
    staged_natural = staged_as_target(tp, natural)
    sets = ", ".join(f"{ident(k)} = t.{ident(k)}::{types[k]}" for k in pk)
    single = len(pk) == 1
    record = (
        f", mapped AS (INSERT INTO _sync.id_map (table_name, source_key, target_key, reason, run_id) "
        f"SELECT {literal(tp.name)}, _source_key, k, 'natural', $1 FROM moved WHERE k <> _source_key "
        f"ON CONFLICT (table_name, source_key) DO NOTHING RETURNING 1) SELECT count(*) FROM mapped"
        if single
        else " SELECT count(*) FROM moved WHERE $1::bigint IS NOT NULL"
    )
    returning = f"s._source_key, s.{ident(pk[0])}::text AS k" if single else "s._source_key"
    return (
        f"WITH moved AS (UPDATE {STAGE} AS s SET {sets}, _mapped = true FROM {table_ident(tp.name)} AS t "
        f"WHERE {row_of(natural, 't.')} = {staged_natural} RETURNING {returning}){record}"
    )


# Types without an equality operator: rows are compared on their text form.
NO_EQUALITY = frozenset({"json", "xml", "point", "line", "lseg", "box", "path", "polygon", "circle"})


def _comparable(columns: Sequence[str], types: dict[str, str], prefix: str) -> str:
    parts = [
        f"{prefix}{ident(c)}::text"
        if types.get(c, "").removesuffix("[]") in NO_EQUALITY
        else f"{prefix}{ident(c)}"
        for c in columns
    ]
    return f"ROW({', '.join(parts)})"


def upsert_sql(tp: TablePlan) -> str:
    """INSERT … SELECT … ON CONFLICT per the table's policy; returns (inserted, updated)."""
    deferred = {c for link in tp.deferred for c in link.columns}
    target_cols, select_exprs = [], []
    for c in tp.columns:
        target_cols.append(c.target)
        if c.target in deferred:
            select_exprs.append("NULL")  # patched by the second pass, once both sides of the cycle landed
        elif c.source_type != c.target_type:
            select_exprs.append(f"s.{ident(c.target)}::{c.target_type}")
        else:
            select_exprs.append(f"s.{ident(c.target)}")
    for col, expr in tp.target_only.items():
        if expr is not None:
            target_cols.append(col)
            select_exprs.append(f"({expr})")
    pk_cast = staged_as_target(tp, tp.primary_key)
    updatable = [c.target for c in tp.columns if c.target not in tp.primary_key and c.target not in deferred]
    if tp.policy == "target-wins" or not updatable:
        conflict = "DO NOTHING"
    else:
        types = tp.target_types
        before, after = _comparable(updatable, types, "t."), _comparable(updatable, types, "EXCLUDED.")
        changed = f"{before} IS DISTINCT FROM {after}"
        if tp.policy == "newest-wins" and "updated_at" in updatable:
            changed += ' AND EXCLUDED."updated_at" > t."updated_at"'
        sets = ", ".join(f"{ident(c)} = EXCLUDED.{ident(c)}" for c in updatable)
        conflict = f"DO UPDATE SET {sets} WHERE {changed}"
    table = table_ident(tp.name)
    # Closure rows (out of the window, needed by a child) are only inserted when the target lacks them.
    present = f"SELECT 1 FROM {table} AS x WHERE {row_of(tp.primary_key, 'x.')} = {pk_cast}"
    wanted = f"s._in_window OR NOT EXISTS ({present})"
    return (
        # OVERRIDING SYSTEM VALUE keeps production's key in a GENERATED ALWAYS identity (a no-op elsewhere).
        f"WITH written AS (INSERT INTO {table} AS t ({column_list(target_cols)}) OVERRIDING SYSTEM VALUE "
        f"SELECT {', '.join(select_exprs)} FROM {STAGE} AS s WHERE {wanted} "
        f"ON CONFLICT ({column_list(tp.primary_key)}) {conflict} RETURNING (xmax = 0) AS inserted) "
        f"SELECT count(*) FILTER (WHERE inserted)::int, count(*) FILTER (WHERE NOT inserted)::int "
        f"FROM written"
    )


async def advance_sequence(conn: asyncpg.Connection, sequence: str, value_sql: str) -> None:
    """Move ``sequence`` (SQL text naming it) forward to at least ``value_sql``; never backwards."""
    await conn.execute(
        f"SELECT setval($1::regclass, v) FROM (SELECT ({value_sql})::bigint AS v) AS x "
        f"WHERE v IS NOT NULL AND v > coalesce(pg_sequence_last_value($1::regclass), 0)",
        sequence,
    )
