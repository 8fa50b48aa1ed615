"""The storage stage of a run, and its survey for ``sync plan``.

A run's stage, after the tables: make sure each bucket exists on the target (a missing one is created
with the source's settings; one whose settings differ is reported and left alone), then settle every
object the rules name, batch by batch, with bounded parallel transfers. The survey reads the same
selection and tells, per bucket, what would be copied and what is already there; it writes nothing
and needs no API key.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from sync.storage.client import StorageApi
from sync.storage.report import StorageReport, settings_drift
from sync.storage.select import (
    BucketRule,
    ColumnRule,
    Wanted,
    bucket_objects,
    bucket_settings,
    referenced_objects,
)
from sync.storage.transfer import Progress, Transfers, TransferSettings


@dataclass(frozen=True)
class StorageRules:
    """What the mapping asks for: path columns of tables, and whole buckets."""

    columns: tuple[ColumnRule, ...] = ()
    buckets: tuple[BucketRule, ...] = ()

    @property
    def bucket_ids(self) -> list[str]:
        """Every bucket the rules touch, in a stable order."""
        return sorted({r.bucket for r in self.columns} | {b.bucket for b in self.buckets})

    def __bool__(self) -> bool:
        return bool(self.columns or self.buckets)


async def wanted_objects(
    sconn: asyncpg.Connection, tconn: asyncpg.Connection, rules: StorageRules, since: datetime | None
) -> AsyncIterator[list[Wanted]]:
    """Every object the rules name, in batches; the same selection for run, plan and verify."""
    for rule in rules.columns:
        async for batch in referenced_objects(sconn, tconn, rule):
            yield batch
    for bucket in rules.buckets:
        async for batch in bucket_objects(sconn, tconn, bucket, since):
            yield batch


async def _check_buckets(
    sconn: asyncpg.Connection,
    tconn: asyncpg.Connection,
    rules: StorageRules,
    report: StorageReport,
    target: StorageApi | None,
) -> None:
    """Create missing target buckets (when ``target`` is given) and note settings that differ."""
    source = await bucket_settings(sconn, rules.bucket_ids)
    known = await bucket_settings(tconn, rules.bucket_ids)
    for bucket in rules.bucket_ids:
        theirs = await target.get_bucket(bucket) if target is not None else known.get(bucket)
        ours = source.get(bucket)
        if ours is None:
            report.drift.setdefault(bucket, []).append("missing in the source")
            continue
        if theirs is None:
            if target is not None:
                await target.create_bucket(ours)
            report.created_buckets.append(bucket)
            continue
        notes = settings_drift(ours, theirs)
        if notes:
            report.drift[bucket] = notes


async def copy_storage(
    sconn: asyncpg.Connection,
    tconn: asyncpg.Connection,
    source: StorageApi,
    target: StorageApi,
    rules: StorageRules,
    *,
    since: datetime | None,
    run_id: int | None,
    settings: TransferSettings | None = None,
    progress: Progress | None = None,
) -> StorageReport:
    """Copy the objects ``rules`` name from ``source`` to ``target``; return what happened.

    ``sconn`` reads the source database, ``tconn`` the target's (it also writes ``_sync`` state and
    repoints rows); neither ever writes ``storage.*``.
    """
    report = StorageReport()
    await _check_buckets(sconn, tconn, rules, report, target)
    transfers = Transfers(
        source,
        target,
        tconn,
        report,
        run_id=run_id,
        settings=settings or TransferSettings(),
        progress=progress,
    )
    async for batch in wanted_objects(sconn, tconn, rules, since):
        await transfers.handle(batch)
    report.finish()
    return report


async def survey_storage(
    sconn: asyncpg.Connection, tconn: asyncpg.Connection, rules: StorageRules, *, since: datetime | None
) -> StorageReport:
    """What a run would copy, per bucket, and the bucket settings that differ; writes nothing."""
    report = StorageReport()
    await _check_buckets(sconn, tconn, rules, report, None)
    async for batch in wanted_objects(sconn, tconn, rules, since):
        for wanted in batch:
            if wanted.source is None:
                report.missing_in_source += 1
            elif wanted.present:
                report.present(wanted.bucket, wanted.source.size)
            else:
                report.wanted(wanted.bucket, wanted.source.size)
    report.finish()
    return report
