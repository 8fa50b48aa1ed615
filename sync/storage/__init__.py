"""The storage stage: the files that copied rows reference, moved through both projects' Storage APIs.

``select`` decides which objects (paths referenced by the target's copies of source rows, or whole
buckets) and where each lands (owner-id prefixes follow the id map); ``client`` talks HTTP to one
project's Storage API; ``transfer`` streams one object at a time and checkpoints it; ``report`` counts;
``stage`` runs it all for ``sync run`` and surveys it for ``sync plan``.
"""

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
