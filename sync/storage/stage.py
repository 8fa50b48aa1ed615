"""The storage stage of a run, and its survey for ``sync plan``.

A run's stage, after the tables: make sure each bucket exists on the target (a missing one is created
with the source's settings; one whose settings differ is reported and left alone), then settle every
object the rules name, batch by batch, with bounded parallel transfers. The survey reads the same
selection and tells, per bucket, what would be copied and what is already there; it writes nothing
and needs no API key.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from sync.connect import Endpoint, connect
from sync.mapping import Mapping
from sync.plan import Plan
from sync.selection import Selection
from sync.storage.client import StorageApi
from sync.storage.report import StorageReport, settings_drift
from sync.storage.rules import storage_rules
from sync.storage.select import StorageRules, Wanted, bucket_objects, bucket_settings, referenced_objects
from sync.storage.transfer import Progress, Transfers, TransferSettings


async def wanted_objects(
    sconn: asyncpg.Connection,
    tconn: asyncpg.Connection,
    rules: StorageRules,
    since: datetime | None,
    plan: Plan | None = None,
) -> AsyncIterator[list[Wanted]]:
    """Every object the rules name, in batches; the same selection for run, plan and verify.

    With ``plan`` (``sync plan``, before a run) the rows the run would copy count too.
    """
    selection = Selection(plan, since) if plan is not None else None
    tables = {t.name: t for t in plan.tables} if plan is not None else {}
    for rule in rules.columns:
        tp = tables.get(rule.table)
        upcoming = (
            (lambda params, alias, tp=tp: selection.selected(tp, params, alias))
            if selection is not None and tp is not None
            else None
        )
        async for batch in referenced_objects(sconn, tconn, rule, upcoming):
            yield batch
    for bucket in rules.buckets:
        async for batch in bucket_objects(sconn, tconn, bucket, since):
            yield batch


async def _has_storage(sconn: asyncpg.Connection, tconn: asyncpg.Connection, report: StorageReport) -> bool:
    """Both databases have Supabase's storage schema; otherwise say which lacks it (nothing to copy)."""
    missing = [
        side
        for side, conn in (("source", sconn), ("target", tconn))
        if not await conn.fetchval("SELECT to_regclass('storage.objects') IS NOT NULL")
    ]
    for side in missing:
        report.notes.append(f"the {side} database has no storage schema (is it a Supabase project?)")
    return not missing


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
    if not await _has_storage(sconn, tconn, report):
        report.finish()
        return report
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
    sconn: asyncpg.Connection,
    tconn: asyncpg.Connection,
    rules: StorageRules,
    *,
    since: datetime | None,
    plan: Plan | None = None,
) -> StorageReport:
    """What a run would copy, per bucket, and the bucket settings that differ; writes nothing.

    With ``plan``, rows the run would copy count as well as those the target holds already.
    """
    report = StorageReport()
    if not await _has_storage(sconn, tconn, report):
        report.finish()
        return report
    await _check_buckets(sconn, tconn, rules, report, None)
    async for batch in wanted_objects(sconn, tconn, rules, since, plan):
        for wanted in batch:
            if wanted.source is None:
                report.missing_in_source += 1
            elif wanted.present:
                report.present(wanted.bucket, wanted.source.size)
            else:
                report.wanted(wanted.bucket, wanted.source.size)
    report.finish()
    return report


@dataclass(frozen=True)
class StorageAccess:
    """Both projects' Storage API: URL and service-role key of each (keys are never printed)."""

    source_url: str
    source_key: str = field(repr=False)
    target_url: str
    target_key: str = field(repr=False)


class StorageStage:
    """The storage stage as a run calls it: rules checked before anything is written, files after rows."""

    def __init__(
        self,
        access: StorageAccess,
        settings: TransferSettings,
        progress: Progress | None = None,
        totals: Progress | None = None,
    ) -> None:
        """``progress`` is told ``(objects, bytes)`` as they settle; ``totals`` first, what lies ahead."""
        self.access = access
        self.settings = settings
        self.progress = progress
        self.totals = totals

    def check(self, plan: Plan, mapping: Mapping) -> StorageRules:
        """The run's storage rules; PlanError (nothing written) when one cannot be followed."""
        return storage_rules(plan, mapping)

    async def run(
        self,
        source: Endpoint,
        tconn: asyncpg.Connection,
        plan: Plan,
        mapping: Mapping,
        since: datetime | None,
        run_id: int,
    ) -> StorageReport:
        """Copy the files the rules name; ``tconn`` is the run's target connection."""
        rules = self.check(plan, mapping)
        if not rules:
            report = StorageReport()
            report.finish()
            return report
        sconn = await connect(source, application_name="sync storage")
        access = self.access
        try:
            if self.totals is not None:
                ahead = await survey_storage(sconn, tconn, rules, since=since)
                work = ahead.copy_total
                self.totals(work.objects + ahead.present_total.objects + ahead.missing_in_source, work.bytes)
            async with (
                StorageApi(access.source_url, access.source_key, side="source") as source_api,
                StorageApi(access.target_url, access.target_key, side="target") as target_api,
            ):
                return await copy_storage(
                    sconn,
                    tconn,
                    source_api,
                    target_api,
                    rules,
                    since=since,
                    run_id=run_id,
                    settings=self.settings,
                    progress=self.progress,
                )
        finally:
            await sconn.close()
