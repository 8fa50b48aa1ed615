"""``sync verify`` for files: every copied row's object is on the target with the same size and hash.

The same selection as the run (:func:`sync.storage.stage.wanted_objects`) and the same test of
sameness (size, and the eTag or the checkpoint of what landed), so verify and run never disagree on
what "there" means. Reads only.
"""

from __future__ import annotations

from datetime import datetime

import asyncpg

from sync.models import Model
from sync.storage.select import StorageRules
from sync.storage.stage import wanted_objects


class StorageCheck(Model):
    """Objects checked, and those missing, different, not pointed at, or missing in the source."""

    objects: int = 0
    missing: int = 0
    different: int = 0
    not_repointed: int = 0
    missing_in_source: int = 0
    examples: list[str] = []

    @property
    def ok(self) -> bool:
        return not (self.missing or self.different or self.not_repointed)

    def line(self) -> str:
        """One line for the verify report."""
        return (
            f"files: {self.objects:,} checked · {self.missing:,} missing · {self.different:,} different · "
            f"{self.not_repointed:,} rows on the old path · {self.missing_in_source:,} missing in the source"
        )


async def check_storage(
    sconn: asyncpg.Connection, tconn: asyncpg.Connection, rules: StorageRules, since: datetime | None
) -> StorageCheck:
    """Compare each wanted object on the target with the source's; writes nothing."""
    check = StorageCheck()
    for side, conn in (("source", sconn), ("target", tconn)):
        if not await conn.fetchval("SELECT to_regclass('storage.objects') IS NOT NULL"):
            check.examples.append(f"the {side} database has no storage schema: no file checked")
    if check.examples:
        return check
    async for batch in wanted_objects(sconn, tconn, rules, since):
        for wanted in batch:
            if wanted.source is None:
                check.missing_in_source += 1
                continue
            check.objects += 1
            if wanted.target is None:
                check.missing += 1
                check.examples.append(f"{wanted.key}: not on the target")
            elif not wanted.present:
                check.different += 1
                check.examples.append(f"{wanted.key}: another size or hash on the target")
            elif wanted.rows:
                check.not_repointed += len(wanted.rows)
                check.examples.append(f"{wanted.key}: a row still holds {wanted.path}")
    check.examples = check.examples[:10]
    return check
