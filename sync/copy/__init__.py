"""Copy the planned tables' rows from source to target: batched, key-remapped, upserted, checkpointed.

A batch is a key range of the source table in the run's selection (:mod:`sync.selection`: the window
and the closure). Each batch is ONE target transaction: stage it (:mod:`.stage`), rewrite its keys and
upsert it (:mod:`.apply`), advance the table's checkpoint (:mod:`.checkpoint`); a large table's pass
is split into key ranges copied at once (:mod:`.table`; what a table's copy is given and reports:
:mod:`.context`). Rows the target refuses go
to quarantine (:mod:`.quarantine`); cycles get a second pass (:mod:`.deferred`); sequences move past
the copied keys (:mod:`.sequences`).
"""

from sync.copy.context import CopyContext, Progress, TableResult
from sync.copy.deferred import DeferredPatch
from sync.copy.sequences import move_sequences
from sync.copy.table import TableCopy

__all__ = [
    "CopyContext",
    "DeferredPatch",
    "Progress",
    "TableCopy",
    "TableResult",
    "move_sequences",
]
