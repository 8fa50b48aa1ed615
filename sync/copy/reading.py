"""The source side of a table's copy: which rows a pass reads, its batches' key ranges and queries.

A pass walks the source's key in batches whose boundaries are read once per pass (one ordered scan,
never an ``OFFSET`` per batch), or, for a closure with few keys, from the list of its keys.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from sync.copy.context import CopyContext
from sync.copy.listing import LISTED_KEYS_MAX, KeyList
from sync.copy.stage import Stage
from sync.plan import TablePlan
from sync.selection import CLOSURE_PASS, Predicate, Selection
from sync.sqltext import Params, column_list, ident, row_of, table_ident


class SourceRanges:
    """The reading half of :class:`sync.copy.table.TableCopy` (a mixin: the copy holds the state)."""

    ctx: CopyContext
    tp: TablePlan
    selection: Selection
    stage: Stage
    source_pk: list[str]
    src_types: dict[str, str]
    phase: Predicate
    phase_number: int
    listed: KeyList | None
    sconn: asyncpg.Connection

    def _in_range(self, params: Params, after: Sequence[str] | None, upto: Sequence[str] | None) -> str:
        """The current pass's rows with keys in (after, upto]; the keys bound as parameters."""
        if self.listed is None:
            parts = [self.phase(params)]
        else:
            (column,) = self.source_pk
            listed = params.bind(self.listed.between(after, upto), "text[]")
            parts = [f"{ident(column)} = ANY({listed}::{self.src_types[column]}[])"]
        keys = row_of(self.source_pk)
        if after is not None:
            parts.append(f"{keys} > {self._key_row(params, after)}")
        if upto is not None:
            parts.append(f"{keys} <= {self._key_row(params, upto)}")
        return " AND ".join(parts)

    def _key_row(self, params: Params, values: Sequence[str]) -> str:
        """A key (as text, as checkpoints keep it) cast back to the source's key types."""
        items = [
            f"{params.bind(v, 'text')}::{self.src_types[c]}"
            for c, v in zip(self.source_pk, values, strict=True)
        ]
        return f"ROW({', '.join(items)})"

    def _select(self, after: list[str] | None, upto: list[str] | None) -> tuple[str, list[Any]]:
        """The source query for the batch (after, upto], and its arguments."""
        params = Params()
        query = self.stage.select_sql(self._in_range(params, after, upto), params)
        return query, params.values

    async def _count_selected(self) -> int:
        """The rows this table's copy will read (for progress bars and their ETA)."""
        params = Params()
        selected = self.selection.selected(self.tp, params)
        return int(
            await self.sconn.fetchval(
                f"SELECT count(*) FROM {table_ident(self.tp.source_name)} WHERE {selected}",
                *params.values,
            )
        )

    async def _boundaries(self, after: list[str] | None, upto: list[str] | None) -> list[list[str]]:
        """The last key of every full batch of the pass in (after, upto], from one ordered scan.

        Read once per pass (never an ``OFFSET`` scan per batch): the batches are the ranges between
        consecutive boundaries, then everything after the last one, so a row that appears after this
        read still falls in a range and is copied. A boundary equal to ``upto`` is left out (the last
        batch ends there anyway). The closure's pass lists its keys instead, when it has few enough.
        """
        self.listed = None
        params = Params()
        where = self._in_range(params, after, upto)
        async with self._closure_hashed():
            if self.phase_number == CLOSURE_PASS and len(self.source_pk) == 1:
                column = ident(self.source_pk[0])
                listed = await self.sconn.fetch(
                    f"SELECT {column}::text FROM {table_ident(self.tp.source_name)} "
                    f"WHERE {where} ORDER BY {column} LIMIT {LISTED_KEYS_MAX + 1}",
                    *params.values,
                )
                if len(listed) <= LISTED_KEYS_MAX:
                    self.listed = KeyList([row[0] for row in listed])
                    return [key for key in self.listed.boundaries(self.ctx.batch_size) if key != upto]
            size = params.bind(self.ctx.batch_size, "bigint")
            keys = column_list(self.source_pk)
            texts = ", ".join(f"{ident(c)}::text" for c in self.source_pk)
            rows = await self.sconn.fetch(
                f"SELECT {texts} FROM (SELECT {keys}, row_number() OVER (ORDER BY {keys}) AS _n "
                f"FROM {table_ident(self.tp.source_name)} WHERE {where}) AS s "
                f"WHERE s._n % {size} = 0 ORDER BY s._n",
                *params.values,
            )
        return [key for key in (list(row.values()) for row in rows) if key != upto]

    @asynccontextmanager
    async def _closure_hashed(self) -> AsyncIterator[None]:
        """On a full run, the closure pass's key listing joins the table with the keys its children
        need by hash: one read of the table, whatever the number of keys.

        The planner cannot estimate how many distinct keys the closure yields (it assumes 200), so it
        would probe the table's key index once per key: hundreds of thousands of probes at scale. A
        full run reads every child's window anyway, so one more scan is within the same bound; a
        catch-up (few changed rows, or keys listed by its census) keeps the probes.
        """
        if self.phase_number != CLOSURE_PASS or self.ctx.changes is not None:
            yield
            return
        await self.sconn.execute("SET LOCAL enable_nestloop = off")
        yield
        await self.sconn.execute("SET LOCAL enable_nestloop TO DEFAULT")  # the batches' own plans
