"""Stage a batch: the source's ``COPY (SELECT …) TO STDOUT`` streamed into a temporary target table.

The stage is typed like the source columns (named as the target names them), plus the row's source
key as text and whether it is in the window (a closure row is only inserted when the target lacks it).
Binary COPY needs the same type on both ends; a source type the target does not know travels as text.
Rows are never decoded in Python on this path. The stage is dropped when the batch's transaction ends.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from sync.pipe import pipe_copy
from sync.plan import TablePlan
from sync.selection import Selection, key_text_sql, source_key_columns
from sync.sqltext import Params, column_list, ident, table_ident

STAGE = "_sync_stage"


def staged_values(expr: str, where: str = "true") -> str:
    """``ARRAY(SELECT expr FROM stage)``: the staged values, for ``column = ANY(…)`` on a target index.

    The stage has no statistics, so a join with a target table may hash that whole table; probing the
    index with the staged values costs one lookup per staged row, whatever the table's size.
    """
    return f"ARRAY(SELECT {expr} FROM {STAGE} AS s WHERE {where})"


class Stage:
    """One table's stage: its format, the source query that fills it, and the two ways to fill it."""

    def __init__(self, tp: TablePlan, selection: Selection) -> None:
        self.tp = tp
        self.selection = selection
        self.columns = [*(c.target for c in tp.columns), "_in_window", "_source_key"]
        self.as_text: set[str] = set()
        """Source types the target does not know: staged as text, and the COPY goes as text."""

    async def choose_format(self, tconn: asyncpg.Connection) -> None:
        """Find the source types the target lacks; binary COPY only when there are none."""
        missing = await tconn.fetch(
            "SELECT t FROM unnest($1::text[]) AS t WHERE to_regtype(t) IS NULL",
            sorted({c.source_type for c in self.tp.columns}),
        )
        self.as_text = {r["t"] for r in missing}

    @property
    def format(self) -> str:
        return "text" if self.as_text else "binary"

    def select_sql(self, where: str, params: Params) -> str:
        """The source query for the rows matching ``where`` (its values bound in ``params``), in key order."""
        cols = []
        for c in self.tp.columns:
            expr = ident(c.source)
            if c.source_type in self.as_text:
                expr = f"{expr}::text"
            cols.append(expr)
        return (
            f"SELECT {', '.join(cols)}, {self.selection.in_window(self.tp, params)} AS _in_window, "
            f"{key_text_sql(self.tp)} AS _source_key FROM {table_ident(self.tp.source_name)} "
            f"WHERE {where} ORDER BY {column_list(source_key_columns(self.tp))}"
        )

    async def create(self, tconn: asyncpg.Connection) -> None:
        """The empty stage, inside the caller's transaction (``ON COMMIT DROP``)."""
        cols = []
        for c in self.tp.columns:
            typ = "text" if c.source_type in self.as_text else c.source_type
            cols.append(f"{ident(c.target)} {typ}")
        await tconn.execute(
            f"CREATE TEMP TABLE {STAGE} ({', '.join(cols)}, _in_window boolean, _source_key text, "
            f"_mapped boolean NOT NULL DEFAULT false) ON COMMIT DROP"
        )

    async def stream(
        self, sconn: asyncpg.Connection, tconn: asyncpg.Connection, query: str, args: Sequence[object]
    ) -> int:
        """Stream the source's COPY of ``query`` into a new stage; return the rows staged."""
        await self.create(tconn)
        return await pipe_copy(sconn, query, args, tconn, STAGE, self.columns, self.format)

    async def load(self, tconn: asyncpg.Connection, records: Sequence[asyncpg.Record]) -> None:
        """A new stage holding ``records`` (rows already read from the source, as when isolating)."""
        await self.create(tconn)
        await tconn.copy_records_to_table(STAGE, records=[tuple(r) for r in records], columns=self.columns)
