"""The table stage of a run: every planned table copied, parents before children, then the deferred
foreign keys patched (cycles, self-references). Independent tables run concurrently, and a large
table's key ranges too, within ``--jobs`` slots."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from sync import copy as table_copy
from sync.errors import LockLostError
from sync.plan import TablePlan

if TYPE_CHECKING:
    from sync.run import RunContext, RunOptions


async def copy_tables(
    ctx: RunContext,
    options: RunOptions,
    progress: table_copy.Progress | None,
    after: Awaitable[object] | None = None,
) -> list[table_copy.TableResult]:
    """Copy every planned table, parents before children; independent tables run concurrently, and
    a large table's key ranges too: ``--jobs`` slots in all, each a source and a target connection.
    No row is copied before ``after`` (the auth import) is done; a table may get ready meanwhile."""
    slots = asyncio.Semaphore(_jobs(ctx, options))
    copy_ctx = _copy_context(ctx, options, progress, slots)
    names = {t.name for t in ctx.plan.tables}
    deferred = {(t.name, link) for t in ctx.plan.tables for link in t.deferred}
    tasks: dict[str, asyncio.Task[table_copy.TableResult]] = {}
    copying = {t.name: asyncio.Event() for t in ctx.plan.tables}
    # One table at a time gets ready while its parents copy (a pair of connections beyond --jobs): its
    # connections and first reads no longer wait for them, one round trip after another.
    ahead = asyncio.Semaphore(1)
    before = asyncio.ensure_future(after) if after is not None else None

    async def one(tp: TablePlan) -> table_copy.TableResult:
        copy = table_copy.TableCopy(copy_ctx, tp)
        parents = {
            link.parent
            for link in tp.parents
            if link.parent in names and link.parent != tp.name and (tp.name, link) not in deferred
        }
        waits = [tasks[parent] for parent in parents] + ([before] if before is not None else [])
        try:
            for parent in parents:
                await copying[parent].wait()
            if not all(task.done() for task in waits):
                async with ahead:
                    await copy.ready()
                    await asyncio.wait(waits)
            for task in waits:
                await task
            async with slots:
                copying[tp.name].set()
                return await copy.run()
        except BaseException:
            await copy.abandon()
            raise

    try:
        async with asyncio.TaskGroup() as group:
            for tp in ctx.plan.tables:  # parents first, so every awaited parent task exists already
                tasks[tp.name] = group.create_task(one(tp))
    except ExceptionGroup as failures:
        lost = failures.subgroup(LockLostError)
        if lost is not None:  # one clear line, not one per table
            raise lost.exceptions[0] from None
        raise
    return [tasks[t.name].result() for t in ctx.plan.tables]


def _jobs(ctx: RunContext, options: RunOptions) -> int:
    return options.jobs or ctx.mapping.sync.jobs


def _copy_context(
    ctx: RunContext,
    options: RunOptions,
    progress: table_copy.Progress | None,
    slots: asyncio.Semaphore | None,
) -> table_copy.CopyContext:
    return table_copy.CopyContext(
        plan=ctx.plan,
        source=ctx.snapshot,
        target=ctx.target,
        run_id=ctx.run_id,
        since=ctx.since,
        batch_size=options.batch_size or ctx.mapping.sync.batch_size,
        progress=progress,
        only_keys=ctx.only_keys,
        guard=ctx.guard,
        changes=ctx.changes,
        jobs=_jobs(ctx, options),
        slots=slots,
        writers=ctx.writers,
    )


async def patch_deferred(ctx: RunContext, options: RunOptions) -> None:
    """Second pass (cycles, self-references): fill the FK columns inserted NULL, now both sides landed.

    One table at a time; a large one's key ranges on up to ``--jobs`` connections."""
    copy_ctx = _copy_context(ctx, options, None, asyncio.Semaphore(_jobs(ctx, options) - 1))
    for tp in ctx.plan.tables:
        if tp.patched_later:
            await table_copy.DeferredPatch(copy_ctx, tp).run()
