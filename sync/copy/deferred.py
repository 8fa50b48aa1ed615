"""The second pass: fill the FK columns that the first pass inserted as NULL.

A cycle (``a`` → ``b`` → ``a``) cannot be inserted in any order with its keys set, so the plan defers
one link; a table's nullable reference to itself is treated alike (a reply may come before its parent
in key order). The first pass inserts that column as NULL, and once both sides have landed,
this pass reads the same rows again (key and deferred columns only), rewrites them through the id map
and sets the columns on the target rows that differ. It resumes from its own checkpoint.
"""

from __future__ import annotations

from dataclasses import replace

from sync.copy.apply import Written, map_own_keys, rewrite_parents, staged_as_target
from sync.copy.context import CopyContext
from sync.copy.stage import STAGE
from sync.copy.table import TableCopy
from sync.plan import TablePlan
from sync.sqltext import Pending, ident, row_of, table_ident


class DeferredPatch(TableCopy):
    """The second pass: fill the FK columns that the first pass inserted as NULL."""

    def __init__(self, ctx: CopyContext, tp: TablePlan) -> None:
        self.full = tp
        later = tp.patched_later
        keep = set(tp.primary_key) | set(tp.row_key) | {c for link in later for c in link.columns}
        narrow = replace(
            tp,
            key=tp.key if tp.key == "natural" else "preserve",
            columns=[c for c in tp.columns if c.target in keep],
            parents=later,
            deferred=[],
            target_only={},
        )
        super().__init__(ctx, narrow)
        self.checkpoint_name = f"{tp.name} (second pass)"

    async def _apply(self, staged: int, pending: Pending) -> Written:
        if staged == 0:
            return Written()
        rewrites = Pending()
        await rewrite_parents(rewrites, self.tp, self.ctx.plan)
        row_key = self.tp.row_key
        if self.tp.key != "natural" and len(row_key) == 1:
            await map_own_keys(rewrites, self.tp)
        await rewrites.send(self.tconn)
        fks = list(dict.fromkeys(c for link in self.tp.parents for c in link.columns))
        target_types = self.tp.target_types
        sets = ", ".join(f"{ident(c)} = s.{ident(c)}::{target_types[c]}" for c in fks)
        # The rows the first pass inserted hold NULL there; a row the target had already is only
        # changed when the run updates it anyway (in the window, and the policy lets production win).
        inserted = " AND ".join(f"t.{ident(c)} IS NULL" for c in fks)
        updates = "s._in_window" if self.full.policy != "target-wins" else "false"
        status = await self.tconn.execute(
            f"UPDATE {table_ident(self.tp.name)} AS t SET {sets} FROM {STAGE} AS s "
            f"WHERE {row_of(row_key, 't.')} = {staged_as_target(self.tp, row_key)} "
            f"AND {row_of(fks, 't.')} IS DISTINCT FROM {staged_as_target(self.tp, fks)} "
            f"AND (({inserted}) OR {updates})"
        )
        return Written(updated=int(status.split()[-1]))
