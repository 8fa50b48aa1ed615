"""The storage stage: the files that copied rows reference, moved through both projects' Storage APIs.

``select`` decides which objects (paths referenced by the target's copies of source rows, or whole
buckets) and where each lands (owner-id prefixes follow the id map); ``client`` talks HTTP to one
project's Storage API; ``transfer`` streams one object at a time and checkpoints it; ``report`` counts;
``stage`` runs it all for ``sync run`` and surveys it for ``sync plan``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sync.lazy import lazy_names

if TYPE_CHECKING:
    from sync.storage.client import StorageApi, StorageApiError
    from sync.storage.report import StorageReport
    from sync.storage.select import BucketRule, ColumnRule, StorageRules
    from sync.storage.stage import copy_storage, survey_storage, wanted_objects
    from sync.storage.transfer import TransferSettings

__all__ = [
    "BucketRule",
    "ColumnRule",
    "StorageApi",
    "StorageApiError",
    "StorageReport",
    "StorageRules",
    "TransferSettings",
    "copy_storage",
    "survey_storage",
    "wanted_objects",
]

# A run report names StorageReport whether or not files move: importing it must not load the stage,
# the selection and the transfers, which only a run that copies files (or plan, verify) uses.
_HOMES = {
    "StorageApi": "sync.storage.client",
    "StorageApiError": "sync.storage.client",
    "StorageReport": "sync.storage.report",
    "BucketRule": "sync.storage.select",
    "ColumnRule": "sync.storage.select",
    "StorageRules": "sync.storage.select",
    "copy_storage": "sync.storage.stage",
    "survey_storage": "sync.storage.stage",
    "wanted_objects": "sync.storage.stage",
    "TransferSettings": "sync.storage.transfer",
}


__getattr__ = lazy_names(__name__, _HOMES)
