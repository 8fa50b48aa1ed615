"""One table's copy: batch by batch over the source key range, from its checkpoint, with retries.

Each pass of the selection (the window, then the closure) walks the source's primary key in batches:
the batch boundaries are read from the source once per pass, each batch is staged and applied in ONE target
transaction that also advances the table's checkpoint. Data and checkpoint commit together, so a
crash never loses or duplicates a batch, and a rerun resumes after the last committed key. Transient
failures (a lost connection, a serialization failure) reconnect and retry the step; a batch the
target refuses for data reasons is split until the bad rows are isolated in quarantine.

A pass of several batches is split into contiguous key ranges (parts, :mod:`.checkpoint`) copied at
once when the run has free job slots: each part on its own source and target connections (the
source's inside the run's exported snapshot) and with its own checkpoint, so a rerun resumes every
part where it stopped. The next pass starts once every part is done.

Which rows a pass reads, its batches' key ranges and queries, are the source side
(:mod:`.reading`); this module is the copy's connections, retries, parts and the target side.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from sync.connect import PoolMode, both
from sync.copy.apply import Written, apply_staged
from sync.copy.checkpoint import Checkpoint, Part, Position
from sync.copy.context import CopyContext, TableResult
from sync.copy.ledger import has_entries
from sync.copy.listing import KeyList
from sync.copy.quarantine import is_data_error, isolate_refused, quarantine_row
from sync.copy.reading import SourceRanges
from sync.copy.sequences import advance_past_source
from sync.copy.stage import Stage
from sync.errors import first_cause, first_line
from sync.plan import TablePlan
from sync.retry import (
    LOCK_NOT_AVAILABLE,
    LOCK_TIMEOUT_S,
    bound_lock_waits,
    is_transient_db_error,
    lock_wait_line,
    retrying,
)
from sync.selection import CLOSURE_PASS, Predicate, Selection, source_key_columns
from sync.sqltext import Pending

log = logging.getLogger("sync")


class TableCopy(SourceRanges):
    """The copy of one table, batch by batch from its checkpoint."""

    def __init__(self, ctx: CopyContext, tp: TablePlan) -> None:
        self.ctx = ctx
        self.tp = tp
        self.result = TableResult(table=tp.name)
        self.checkpoint_name = tp.name
        self.selection = Selection(ctx.plan, ctx.since, ctx.only_keys, ctx.changes)
        self.stage = Stage(tp, self.selection)
        self.source_pk = source_key_columns(tp)
        self.src_types = {c.source: c.source_type for c in tp.columns}
        self.phase: Predicate = lambda params: "true"
        self.phase_number = 0
        self.key_floor: int | None = None
        self.ledger_fresh = False
        """No row of the table had landed when this copy began (:func:`.ledger.record_landed`)."""
        self.listed: KeyList | None = None
        """The current pass's keys, when it is read by its keys (:mod:`.listing`)."""
        self._sconn: asyncpg.Connection | None = None
        self._tconn: asyncpg.Connection | None = None
        self._lock_waited = 0.0
        self._start: tuple[Position, bool, int] | None = None
        """Where the copy starts, once :meth:`ready`: position, whether done, rows already committed."""

    # -------------------------------------------------------------------------------- lifecycle

    async def ready(self) -> None:
        """Open the connections and read where the copy starts (its checkpoint, the staging format,
        where fresh keys start): nothing that needs the parents landed, so it may run while they copy."""
        if self._start is not None or self.selection.quiet(self.tp):
            return
        started = time.perf_counter()
        try:
            await self._connect()
            # Retried like every step: a connection handed on may have ended while it waited.
            start = await self._with_retries(lambda: self.checkpoint.load(self.tconn))
            if not start[1]:
                await self._prepare()
            self._start = start
        except BaseException:
            await self._close()
            raise
        finally:
            self.result.seconds += time.perf_counter() - started

    async def run(self) -> TableResult:
        """Copy every selected row after the checkpoint, pass by pass; return the counts."""
        if self.selection.quiet(self.tp):
            self.result.quiet = True
            return self.result
        await self.ready()
        started = time.perf_counter()
        try:
            await self._copy()
        except BaseException:
            await self._close()
            raise
        finally:
            self.result.seconds += time.perf_counter() - started
        self._give_back()
        return self.result

    async def abandon(self) -> None:
        """Close what :meth:`ready` opened when the copy will not run (a parent failed)."""
        await self._close()

    async def _copy(self) -> None:
        assert self._start is not None
        start, done, rows_done = self._start
        if done:
            return
        self._begin_progress(rows_done)
        if getattr(self.ctx.progress, "wants_totals", False):
            total = await self._with_retries(self._count_selected)
            self.ctx.progress.total(self.tp.name, total)  # type: ignore[union-attr]
        for number, phase in enumerate(self.selection.phases(self.tp)):
            if number < start.phase:
                continue
            self.phase, self.phase_number = phase, number
            await self._copy_pass(number, start.key if number == start.phase else None)
        await self._with_retries(lambda: self.checkpoint.mark_done(self.tconn))

    async def _copy_pass(self, number: int, after: list[str] | None) -> None:
        """Pass ``number`` after key ``after``: in one piece, or in parts (an earlier attempt's, or new)."""
        parts = await self._with_retries(lambda: self.checkpoint.recorded_parts(self.tconn, number))
        if parts is None:
            boundaries = await self._with_retries(lambda: self._boundaries(after, None))
            parts = self._split(number, after, boundaries)
            if not parts:
                # The last batch of a pass records the start of the next one.
                await self._copy_batches(number, after, boundaries, None, Position(number + 1, None))
                return
            await self._with_retries(lambda: self._record_parts(parts))
        await self._copy_parts(parts)
        await self._with_retries(lambda: self._advance_after_parts(number))

    async def _connect(self) -> None:
        """Both connections, the run's idle ones or new ones opened at once (what one of them left when
        the other failed is closed by the next attempt's :meth:`_close`)."""
        await self._close()

        async def target() -> None:
            self._tconn = await self.ctx.writers.take()

        async def source() -> None:
            self._sconn = await self.ctx.source.reader()

        await both(target(), source())

    async def _close(self) -> None:
        """Close both connections (after a failure: their state is not known)."""
        for conn in (self._sconn, self._tconn):
            if conn is not None and not conn.is_closed():
                conn.terminate()
        self._sconn = self._tconn = None

    def _give_back(self) -> None:
        """Hand both connections on to the run's next copy: this one ended cleanly."""
        if self._sconn is not None:
            self.ctx.source.give_back(self._sconn)
        if self._tconn is not None:
            self.ctx.writers.give_back(self._tconn)
        self._sconn = self._tconn = None

    async def _with_retries(self, step: Callable[[], Awaitable[Any]]) -> Any:
        async def attempt() -> Any:
            lost = [
                side
                for side, conn in (("source", self._sconn), ("target", self._tconn))
                if conn is not None and conn.is_closed()
            ]
            if lost:
                # The driver saw the connection drop between statements: a retry like any other.
                self.result.retries += 1
                log.warning(
                    "%s: %s connection lost; reconnecting",
                    self.tp.name,
                    " and ".join(lost),
                )
            if lost or self._tconn is None or self._sconn is None:
                await self._connect()
            try:
                return await step()
            except BaseException as exc:
                if is_transient_db_error(exc):
                    self.result.retries += 1
                    if getattr(exc, "sqlstate", None) == LOCK_NOT_AVAILABLE:
                        await self._report_lock_wait()
                    await self._close()
                raise

        return await retrying(what=f"copy of {self.tp.name}")(attempt)

    async def _report_lock_wait(self) -> None:
        """Say whose lock the step gave up waiting for; it is retried with backoff, so waits are bounded."""
        self._lock_waited += LOCK_TIMEOUT_S
        tables = [self.tp.name, *(link.parent for link in self.tp.parents)]
        log.warning("%s", await lock_wait_line(self.tconn, tables, self._lock_waited))

    @asynccontextmanager
    async def _writing(self) -> AsyncIterator[None]:
        """A target transaction that commits only while the run holds its lock; lock waits are bounded."""
        async with self.tconn.transaction():
            if self.ctx.target.mode is PoolMode.TRANSACTION:
                await bound_lock_waits(self.tconn, local=True)
            if self.ctx.guard is not None:
                await self.ctx.guard(self.tconn)
            yield

    @property
    def sconn(self) -> asyncpg.Connection:
        assert self._sconn is not None
        return self._sconn

    @property
    def tconn(self) -> asyncpg.Connection:
        assert self._tconn is not None
        return self._tconn

    # ------------------------------------------------------------------------------------ parts

    @property
    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self.ctx.run_id, self.checkpoint_name)

    def _split(self, number: int, after: list[str] | None, boundaries: list[list[str]]) -> list[Part]:
        """The pass in parts copied at once, up to ``--jobs``; none when it is copied in one piece.

        A table whose fresh keys come from its highest key (no sequence) is copied in one piece: two
        parts would pick the same keys.
        """
        if self.ctx.slots is None:
            return []
        if self.tp.allocates_keys and self.tp.primary_key[0] not in self.tp.sequences:
            return []
        return self.checkpoint.split(number, after, boundaries, self.ctx.jobs)

    async def _record_parts(self, parts: list[Part]) -> None:
        async with self._writing():
            await self.checkpoint.record_parts(self.tconn, parts)

    async def _advance_after_parts(self, number: int) -> None:
        """Every part of pass ``number`` is done: the table's checkpoint moves to the next pass."""
        async with self._writing():
            await self.checkpoint.advance(self.tconn, Position(number + 1, None), 0)

    async def _copy_parts(self, parts: list[Part]) -> None:
        """Copy the unfinished parts: one lane on this copy's own job slot, one more per free slot.

        A lane takes the next part until none is left; a lane still waiting for a slot then is called
        off (never waited for: every slot may be held by a table copy waiting for its own lanes).
        """
        queue = deque(parts)
        waiting: set[asyncio.Task[Any]] = set()

        async def lane(worker: TableCopy) -> None:
            try:
                while queue:
                    await worker._copy_part(queue.popleft())
            except BaseException:
                if worker is not self:
                    await worker._close()
                raise
            if worker is not self:
                worker._give_back()

        async def extra_lane() -> None:
            assert self.ctx.slots is not None
            async with self.ctx.slots:
                waiting.discard(asyncio.current_task())  # type: ignore[arg-type]
                if queue:
                    await lane(self._lane())

        try:
            async with asyncio.TaskGroup() as group:
                waiting.update(group.create_task(extra_lane()) for _ in range(len(queue) - 1))
                await lane(self)
                for task in waiting:
                    task.cancel()
        except BaseExceptionGroup as failures:
            raise first_cause(failures) from None  # one table, one failure, as for a table in one piece

    def _lane(self) -> TableCopy:
        """Another worker for this copy's parts: the same table, counts and progress; its own connections."""
        worker = copy.copy(self)
        worker._sconn = worker._tconn = None
        worker._lock_waited = 0.0
        return worker

    async def _copy_part(self, part: Part) -> None:
        boundaries = part.boundaries
        if boundaries is None:
            boundaries = await self._with_retries(lambda: self._boundaries(part.after, part.upto))
        final = Position(part.phase, part.upto, done=True)
        await self._copy_batches(part.phase, part.after, boundaries, part.upto, final, part)

    # ---------------------------------------------------------------------------------- reading

    async def _prepare(self) -> None:
        """Decide the staging format; for a table that allocates keys, where its fresh keys start."""
        await self.stage.choose_format(self.tconn)
        self.ledger_fresh = not await self._with_retries(lambda: has_entries(self.tconn, self.tp))
        if self.tp.allocates_keys:
            self.key_floor = await self._with_retries(
                lambda: advance_past_source(self.sconn, self.tconn, self.tp)
            )

    # ---------------------------------------------------------------------------------- writing

    async def _copy_batches(
        self,
        number: int,
        after: list[str] | None,
        boundaries: Sequence[list[str]],
        upto: list[str] | None,
        final: Position,
        part: Part | None = None,
    ) -> None:
        """Copy the batches of pass ``number`` in (after, upto] that end at ``boundaries``; the last one
        (ending at ``upto``) records ``final``."""
        ends = [*boundaries, upto]
        for index, end in enumerate(ends):
            position = final if index == len(ends) - 1 else Position(number, end)
            await self._with_retries(lambda a=after, e=end, p=position: self._copy_range(a, e, p, part))
            after = end

    async def _copy_range(
        self, after: list[str] | None, upto: list[str] | None, position: Position, part: Part | None = None
    ) -> None:
        """Copy the rows in (after, upto]; split and quarantine if the target refuses some."""
        try:
            async with self._writing():
                count = await self.stage.stream(self.sconn, self.tconn, *self._select(after, upto))
                ledger_and_checkpoint = Pending()
                written = await self._apply(count, ledger_and_checkpoint)
                await self.checkpoint.advance(ledger_and_checkpoint, position, count, part)
                await ledger_and_checkpoint.send(self.tconn)
            self._count(written)
            self.result.batches += 1
            self._report(count)
        except Exception as exc:
            if not is_data_error(exc):
                raise
            log.info(
                "%s: batch refused (%s); isolating the rows",
                self.tp.name,
                first_line(exc),
            )
            query, args = self._select(after, upto)
            records = list(await self.sconn.fetch(query, *args))
            await isolate_refused(records, self._land, self._quarantine)
            async with self._writing():
                await self.checkpoint.advance(self.tconn, position, len(records), part)
            self.result.batches += 1
            self._report(len(records))

    def _count(self, written: Written) -> None:
        """Add a committed transaction's counts (never those of one that rolled back)."""
        self.result.inserted += written.inserted
        self.result.updated += written.updated
        self.result.remapped += written.remapped

    def _begin_progress(self, rows_done: int) -> None:
        """Show the table starting from the rows an interrupted attempt of this run already committed."""
        begin = getattr(self.ctx.progress, "begin", None)
        if begin is not None:
            begin(self.tp.name, rows_done)

    def _report(self, rows: int) -> None:
        self.result.read += rows
        if self.phase_number == CLOSURE_PASS:
            self.result.parents += rows
        if self.ctx.progress is not None:
            self.ctx.progress(self.tp.name, rows)

    async def _land(self, records: list[asyncpg.Record]) -> None:
        """Stage and apply rows already read, in one transaction of their own."""
        async with self._writing():
            await self.stage.load(self.tconn, records)
            ledger = Pending()
            written = await self._apply(len(records), ledger)
            await ledger.send(self.tconn)
        self._count(written)

    async def _quarantine(self, record: asyncpg.Record, exc: BaseException) -> None:
        async with self._writing():
            await quarantine_row(self.tconn, self.ctx.run_id, self.tp.name, record, exc)
        self.result.quarantined += 1
        log.warning(
            "%s: row %s quarantined: %s",
            self.tp.name,
            record["_source_key"],
            first_line(exc),
        )

    async def _apply(self, staged: int, pending: Pending) -> Written:
        """Land the staged rows, inside the caller's transaction; the last statements (those nothing
        waits for) are left in ``pending``, for the caller to send with its own."""
        if staged == 0:
            return Written()
        ctx, changes, fresh = self.ctx, self.ctx.changes, self.ledger_fresh
        # A catch-up read the quarantine as it began (under the run lock): with none of the table's rows
        # there, and none put there by this copy, no staged row can be in it.
        held = changes is None or bool(changes.held.get(self.tp.name)) or self.result.quarantined > 0
        return await apply_staged(
            self.tconn,
            self.tp,
            ctx.plan,
            ctx.run_id,
            self.key_floor,
            ledger_fresh=fresh,
            held=held,
            pending=pending,
        )
