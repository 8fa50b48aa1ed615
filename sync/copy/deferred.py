"""The second pass of a foreign-key cycle: fill the FK columns that the first pass inserted as NULL.

A cycle (``a`` → ``b`` → ``a``) cannot be inserted in any order with its keys set, so the plan defers
one link: the first pass inserts that column as NULL, and once both sides of the cycle have landed,
this pass reads the same rows again (key and deferred columns only), rewrites them through the id map
and sets the columns on the target rows that differ. It resumes from its own checkpoint.
"""

from __future__ import annotations

from dataclasses import replace

from sync.copy.apply import Written, map_own_keys, rewrite_parents, staged_as_target
from sync.copy.stage import STAGE
from sync.copy.table import CopyContext, TableCopy
from sync.plan import TablePlan
from sync.sqltext import ident, row_of, table_ident


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
        await rewrite_parents(self.tconn, self.tp, self.ctx.plan)
        pk = self.tp.primary_key
        if len(pk) == 1:
            await map_own_keys(self.tconn, self.tp)
        fks = [c for link in self.tp.parents for c in link.columns]
        target_types = self.tp.target_types
        sets = ", ".join(f"{ident(c)} = s.{ident(c)}::{target_types[c]}" for c in fks)
        status = await self.tconn.execute(
            f"UPDATE {table_ident(self.tp.name)} AS t SET {sets} FROM {STAGE} AS s "
            f"WHERE {row_of(pk, 't.')} = {staged_as_target(self.tp, pk)} "
            f"AND {row_of(fks, 't.')} IS DISTINCT FROM {staged_as_target(self.tp, fks)}"
        )
        return Written(updated=int(status.split()[-1]))
