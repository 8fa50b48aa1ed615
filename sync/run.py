"""A whole run: lock, plan, auth import, tables in FK order, second pass, sequences, run record.

``connect → introspect → plan → auth import → copy tables → finish``. The CLI calls :func:`run_sync`;
it is usable as a library too. Every stage below this one is in its own module.

Longer than ~400 lines because it holds the two orchestrations that share the lock, the preflight and
the run record: the full run and the auth-only run. That is the seam to split along when it grows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID

import asyncpg

from sync import copy as table_copy
from sync.auth import AdminApi, AuthOptions, AuthReport, UserProgress, import_users
from sync.auth.columns import USERS_TABLE
from sync.auth.match import DeletedAccounts
from sync.auth.settle import StoredOtherwise, stored_otherwise_ahead
from sync.census import READERS, take_census
from sync.connect import Endpoint, call_off, connect
from sync.copy.context import target_writers
from sync.copy.ledger import refresh_statistics
from sync.deletes import DeletesReport, copy_date
from sync.deletes.basis import forget_basis, last_basis
from sync.errors import EXIT_OK, EXIT_QUARANTINED, LockLostError, first_cause, first_line
from sync.mapping import Mapping
from sync.models import Model
from sync.modes import DeleteMode
from sync.plan import Plan
from sync.plan.load import open_plan
from sync.pool import IdleConnections
from sync.preflight import AuthScope, Check, Needs, preflight, reach
from sync.retry import retrying
from sync.run_connection import RunConnection, reach_early
from sync.run_deletes import deletes_beside, production_deletes
from sync.run_tables import copy_tables, patch_deferred
from sync.selection import Changes, Selection
from sync.snapshot import SourceSnapshot
from sync.state import (
    CATCH_UP_OVERLAP,
    RunLock,
    WriteGuard,
    begin_run,
    catch_up_point,
    finish_run,
    quarantined_keys,
    record_high_water,
)
from sync.storage.report import StorageReport

if TYPE_CHECKING:
    from sync.storage.stage import StorageStage

log = logging.getLogger("sync")

T = TypeVar("T")

AuthStage = Callable[["RunContext"], Awaitable[AuthReport]]


@dataclass
class RunOptions:
    """What the user asked of this run."""

    since: datetime | None = None
    restart: bool = False
    overlap: timedelta = CATCH_UP_OVERLAP
    batch_size: int | None = None
    jobs: int | None = None
    skip_auth: bool = False
    retry_quarantine: bool = False
    """Re-attempt only the rows in quarantine (after the cause was fixed); no window, no catch-up mark."""
    deletes: DeleteMode = DeleteMode.REPORT
    """Production deletes: only reported, or applied on the target (users deleted, or soft-deleted)."""


@dataclass
class RunContext:
    """What the stages of a run share."""

    source: Endpoint
    target: Endpoint
    mapping: Mapping
    plan: Plan
    snapshot: SourceSnapshot
    run_id: int
    since: datetime | None
    only_keys: dict[str, list[str]] | None = None
    auth_since: datetime | None = None
    """Set on catch-up runs: only users changed since then need the auth stage."""
    guard: WriteGuard | None = None
    """The run lock's check, made in every write transaction before it commits."""
    changes: Changes | None = None
    """Set on catch-up runs: the transactions since the previous run's snapshot, whose writes are read."""
    deleted_accounts: DeletedAccounts = frozenset()
    """Target users whose production account was deleted (and that are still there), or the search that
    will know them (the auth import stages production's users meanwhile)."""
    writers: IdleConnections | None = None
    """The target connections the table copies hand on to one another (closed when the run ends)."""
    odd_target: asyncio.Future[StoredOtherwise] | None = None
    """The target's users stored otherwise, being read on one of ``writers`` while production's keys are."""


class RunReport(Model):
    """What a run did; ``exit_code`` is 0 when everything landed, 3 when some rows were quarantined."""

    run_id: int
    since: datetime | None
    high_water: datetime | None
    resumed: bool
    tables: list[table_copy.TableResult] = []
    auth: AuthReport | None = None
    storage: StorageReport | None = None
    deletes: DeletesReport | None = None
    sequences_moved: int = 0
    seconds: float = 0.0

    @property
    def quarantined(self) -> int:
        return (
            sum(t.quarantined for t in self.tables)
            + (self.auth.quarantined if self.auth else 0)
            + (self.storage.quarantined if self.storage else 0)
        )

    @property
    def exit_code(self) -> int:
        return EXIT_QUARANTINED if self.quarantined else EXIT_OK

    def counts(self) -> dict[str, Any]:
        """The per-table counts, as stored with the run."""
        return {
            "tables": {t.table: t.model_dump(include=_STORED_COUNTS) for t in self.tables},
            "auth": self.auth.model_dump(mode="json", exclude={"notes", "quarantined_users"})
            if self.auth
            else {},
            "storage": self.storage.counts() if self.storage else {},
        }

    def to_json(self) -> dict[str, Any]:
        """The machine-readable summary ``sync run --json`` prints."""
        return {
            "run_id": self.run_id,
            "since": self.since.isoformat() if self.since else None,
            "high_water": self.high_water.isoformat() if self.high_water else None,
            "resumed": self.resumed,
            "exit_code": self.exit_code,
            "seconds": round(self.seconds, 3),
            "auth": self.auth.model_dump(mode="json") if self.auth else None,
            "tables": [t.model_dump(mode="json") for t in self.tables],
            "deletes": self.deletes.model_dump(mode="json") if self.deletes else None,
            "sequences_moved": self.sequences_moved,
            "storage": self.storage.counts() if self.storage else None,
        }


_STORED_COUNTS = {"read", "parents", "inserted", "updated", "quarantined", "remapped"}


def auth_import(
    options: AuthOptions, admin_api: AdminApi | None = None, progress: UserProgress | None = None
) -> AuthStage:
    """The auth stage of a run: every source user on the target, ids mapped, before any table row."""

    async def stage(ctx: RunContext) -> AuthReport:
        return await import_users(
            ctx.source,
            ctx.target,
            options,
            admin_api=admin_api,
            run_id=ctx.run_id,
            changed_since=ctx.auth_since,
            snapshot=ctx.snapshot,
            guard=ctx.guard,
            only_ids=None if ctx.only_keys is None else [UUID(k) for k in ctx.only_keys.get(USERS_TABLE, [])],
            changes=ctx.changes,
            deleted_accounts=ctx.deleted_accounts,
            progress=progress,
            odd_target=ctx.odd_target,
        )

    return stage


async def run_sync(
    source: Endpoint,
    target: Endpoint,
    mapping: Mapping,
    options: RunOptions,
    *,
    auth_stage: AuthStage | None = None,
    progress: table_copy.Progress | None = None,
    storage_stage: StorageStage | None = None,
    checks: Sequence[Check] = (),
) -> RunReport:
    """Run the whole pipeline once; resumable: a rerun continues from the checkpoints.

    ``storage_stage`` copies the files the rows reference, after the tables (see sync.storage).
    Nothing is written before the plan and the preflight (plus ``checks``) pass; a run resumes only
    runs that read the same source.
    """
    started = time.perf_counter()
    source, target, opening, lock_conn = await reach_early(source, target)
    lock = RunLock(target)
    first = [opening] if opening is not None else []  # the first attempt's; a retry opens its own

    async def read_plan() -> tuple[Plan, tuple[asyncpg.Connection, asyncpg.Connection]]:
        return await open_plan(source, target, mapping, first.pop() if first else None)

    try:
        plan, sides = await retrying(what="reading both catalogs")(read_plan)
    except BaseException:
        await lock_conn.discard()
        raise
    try:
        if storage_stage is not None:
            storage_stage.check(plan, mapping)
        users = auth_stage is not None and not options.skip_auth
        needs = Needs(writes=True, auth=users, extra=checks)
        checked = await preflight(source, target, plan, needs, on=sides)
        log.info("source: %s", checked.source.describe(source))
        log.info("target: %s", checked.target.describe(target))
        for note in checked.notes:
            log.info(note)
        await lock_conn.take(lock)
    except BaseException:
        await asyncio.gather(lock_conn.discard(), sides[0].close(), sides[1].close())
        raise
    users = users and checked.auth is AuthScope.BOTH
    tconn = sides[1]
    bookkeeping = RunConnection(target, tconn)
    snapshot = SourceSnapshot(source)
    snapshot.connect_ahead(READERS)  # the census's readers, while the run's record is read and written
    writers = target_writers(target)
    # The snapshot is exported while the run's record is read and written: both after the lock is held.
    exporting = asyncio.ensure_future(snapshot.open(sides[0]))
    copied: asyncio.Future[datetime | None] | None = None
    odd_target: asyncio.Future[StoredOtherwise] | None = None
    try:
        since = options.since
        mark, previous = await catch_up_point(tconn, options.overlap, checked.source_identity)
        basis = await last_basis(tconn, checked.source_identity)
        catch_up = since is None and mark is not None and not options.restart and not options.retry_quarantine
        if catch_up:
            since = mark
        run = await begin_run(
            tconn,
            since,
            restart=options.restart,
            options=_describe(options, mapping),
            retry=options.retry_quarantine,
            source=checked.source_identity,
        )
        since = run.since
        only_keys = await quarantined_keys(tconn) if options.retry_quarantine else None
        if only_keys is not None:
            plan = replace(plan, tables=[t for t in plan.tables if t.name in only_keys])
        await exporting
        xids = snapshot.xids
        if snapshot.high_water is not None and not options.retry_quarantine:
            await record_high_water(
                tconn, run.id, snapshot.high_water, *((xids.xmin, xids.snapshot) if xids else ())
            )
        changes = (
            Changes(previous.xmin, xids.xmax, await quarantined_keys(tconn), previous.snapshot)
            if catch_up and previous is not None and xids
            else None
        )
        # The copy date production deletes are judged by, read beside the census (it never changes).
        copied = None if options.retry_quarantine else asyncio.ensure_future(bookkeeping.call(copy_date))
        census = None

        def read_ahead() -> None:
            """The target's users stored otherwise, a read of every target user, read beside the rest of
            the census or the import's read of production's keys: settling waits for it only if it is still
            going. Not when the census found no user changed (the import then reads nothing)."""
            nonlocal odd_target
            if odd_target is None and users and _users_to_import(only_keys):
                odd_target = asyncio.ensure_future(stored_otherwise_ahead(writers))

        if not options.retry_quarantine and (changes is not None or basis is not None):
            selection = Selection(plan, since, None, changes)
            census = await retrying(what="counting the source's tables")(
                take_census,
                snapshot,
                plan,
                selection,
                since if catch_up and users else None,
                basis,
                read_ahead,
            )
            if changes is not None:
                changes = replace(changes, quiet=census.quiet, keyed=census.keyed)
        copy_day = await copied if copied is not None else None  # before the connection serves anything else
        if not (changes is not None and USERS_TABLE in changes.quiet):
            read_ahead()
        report = RunReport(
            run_id=run.id, since=since, high_water=run.high_water or snapshot.high_water, resumed=run.resumed
        )
        ctx = RunContext(
            source,
            target,
            mapping,
            plan,
            snapshot,
            run.id,
            since,
            only_keys,
            auth_since=since if catch_up else None,
            guard=lock.confirm,
            changes=changes,
            writers=writers,
            odd_target=odd_target,
        )
        if census is None or any(t.name not in census.quiet for t in plan.tables):
            writers.open_ahead()  # the first table's target connection, while the stages before it run
        finding: asyncio.Task[tuple[DeletesReport, set[str]]] | None = None
        try:
            if not options.retry_quarantine:
                finding, ctx.deleted_accounts = deletes_beside(
                    lambda known: production_deletes(
                        snapshot, target, plan, options.deletes, basis, census, known, copy_day
                    ),
                    applied=options.deletes is not DeleteMode.REPORT,
                )
            importing = (
                asyncio.ensure_future(auth_stage(ctx))
                if auth_stage is not None and users and _users_to_import(only_keys)
                else None
            )
            # The tables get ready while the users are imported; they copy no row before all are in.
            tables = asyncio.ensure_future(copy_tables(ctx, options, progress, after=importing))
            try:
                if importing is not None:
                    report.auth = await importing
                report.tables = await tables
            except BaseException:
                await call_off(tables, importing)
                raise
            await patch_deferred(ctx, options)
            if finding is not None:
                report.deletes, _ = await finding
            report.sequences_moved = await bookkeeping.call(lambda c: table_copy.move_sequences(c, plan))
            if storage_stage is not None:
                report.storage = await storage_stage.run(
                    source, await bookkeeping.alive(), plan, mapping, since, run.id
                )
        except LockLostError:
            raise  # the run is no longer this process's to record
        except (Exception, asyncio.CancelledError) as exc:
            status = (
                "interrupted" if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt)) else "failed"
            )
            counts = {**report.counts(), "error": failure_line(exc, source, target)}
            await asyncio.shield(bookkeeping.call(lambda c: finish_run(c, run.id, status, counts)))
            raise
        finally:
            if finding is not None and not finding.done():
                finding.cancel()
                await asyncio.gather(finding, return_exceptions=True)
        report.seconds = time.perf_counter() - started
        status = "quarantined" if report.quarantined else "succeeded"

        settled = report.deletes.basis(xids.snapshot) if report.deletes and xids else None
        if settled is not None and not await snapshot.held():
            settled = None  # some reads (and so landed rows) came from another snapshot

        async def close_run(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                await lock.confirm(conn)
                await finish_run(conn, run.id, status, report.counts(), settled)

        await bookkeeping.call(close_run)

        async def once(step: LedgerStep) -> bool:  # not retried: the next run may as well plan without
            return await step(await bookkeeping.alive())

        await keep_ledger_planned(once, _ledger_entries(report.auth, report.tables))
        return report
    finally:
        await call_off(exporting, copied, odd_target)
        await asyncio.gather(snapshot.close(), writers.close(), bookkeeping.close())
        await lock.release()


LedgerStep = Callable[[asyncpg.Connection], Awaitable[bool]]


async def keep_ledger_planned(call: Callable[[LedgerStep], Awaitable[bool]], entries: int) -> None:
    """Once a run is recorded, refresh the ledger's statistics (on a connection ``call`` gives) when the run
    grew it (:func:`~sync.copy.ledger.refresh_statistics`). They only speed the next run up: a failure is
    a warning, never the run's."""
    try:
        await call(lambda conn: refresh_statistics(conn, entries))
    except Exception as exc:
        log.warning("the ledger's statistics were not refreshed: %s", first_line(exc))


def _ledger_entries(auth: AuthReport | None, tables: Sequence[table_copy.TableResult] = ()) -> int:
    """At most how many ledger entries a run added: one per user or row it read that was not held back."""
    users = auth.source_users - auth.quarantined if auth else 0
    return users + sum(t.read - t.quarantined for t in tables)


def _users_to_import(only_keys: dict[str, list[str]] | None) -> bool:
    """Whether the auth stage has work: always, but in a quarantine retry only for quarantined users."""
    return only_keys is None or bool(only_keys.get(USERS_TABLE))


async def run_auth_only(
    source: Endpoint,
    target: Endpoint,
    options: AuthOptions,
    admin_api: AdminApi | None = None,
    progress: UserProgress | None = None,
) -> AuthReport:
    """The auth import alone (``sync run --auth-only``): under the run lock, inside an exported snapshot."""
    source, target = await reach(source, target)
    needs = Needs(writes=True, auth=True, extra=admin_api_checks(options, admin_api))
    await preflight(source, target, Plan(tables=[], auth_mode=options.mode), needs)
    lock = RunLock(target)
    await lock.acquire()
    snapshot = SourceSnapshot(source)
    try:
        conn = await connect(target, application_name="sync run")
        try:
            await forget_basis(conn)
        finally:
            await conn.close()
        await snapshot.open()
        report = await import_users(
            source,
            target,
            options,
            admin_api=admin_api,
            snapshot=snapshot,
            guard=lock.confirm,
            progress=progress,
        )

        async def on_target(step: LedgerStep) -> bool:
            conn = await connect(target, application_name="sync run")
            try:
                return await step(conn)
            finally:
                await conn.close()

        await keep_ledger_planned(on_target, _ledger_entries(report))
        return report
    finally:
        await snapshot.close()
        await lock.release()


def admin_api_checks(options: AuthOptions, admin_api: AdminApi | None) -> list[Check]:
    """In admin-api mode, the preflight's check that the Auth server answers and accepts the key (one
    authenticated request): an unreachable URL or a refused key is one line before anything is written."""
    if admin_api is None or options.mode != "admin-api":
        return []

    async def check() -> None:
        from sync.auth import check_admin_api  # the admin API's client loads only in this mode

        await check_admin_api(admin_api, options)

    return [check]


def failure_line(exc: BaseException, source: Endpoint, target: Endpoint) -> str:
    """The one line a failed run is recorded with (``sync status`` shows it), passwords removed."""
    return target.redact(source.redact(first_line(first_cause(exc))))


def _describe(options: RunOptions, mapping: Mapping) -> dict[str, Any]:
    return {
        "since": options.since.isoformat() if options.since else None,
        "batch_size": options.batch_size or mapping.sync.batch_size,
        "jobs": options.jobs or mapping.sync.jobs,
        "mapping": mapping.origin,
        "deletes": str(options.deletes),
    }
