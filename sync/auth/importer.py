"""One auth import's flow: match every production user first, then stream the source in batches to the
direct writer or through the admin API, counting and noting what became of each user."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from itertools import chain, islice
from typing import TYPE_CHECKING, Literal, Protocol
from uuid import UUID

import asyncpg

from sync.auth.admin_api_user import api_refusal, uncarried
from sync.auth.direct import StagedUser, TargetWriter
from sync.auth.direct_copy import CopyCreator, Group, Lanes, Readers, write_groups
from sync.auth.match import (
    DeletedAccounts,
    MatchKind,
    SourceKey,
    UserMatch,
    deleted_ones,
    match_users,
    normal_email,
    normal_phone,
    read_id_map,
    read_target_keys,
)
from sync.auth.options import AuthOptions, ConflictPolicy
from sync.auth.report import AuthReport, QuarantinedUser, UserNote, direct_notes
from sync.auth.settle import CREATED, MATCHER, SAME_ID, Settled, StoredOtherwise, settle_users
from sync.auth.source import SourceSnapshot, read_only_snapshot
from sync.selection import Changes

if TYPE_CHECKING:
    from sync.auth.admin_api import AdminApiCreator

GROUPS_PER_LANE = 4
"""How many COPY groups each lane is given, at most, when the users are many."""

Batch = tuple[list[asyncpg.Record], dict[UUID, list[asyncpg.Record]]]
"""Source user rows, and the identities of each (by user id)."""


class UserProgress(Protocol):
    """What the import tells a progress display: the users ahead, then each batch as it lands."""

    def users_total(self, users: int) -> None: ...

    def users(self, users: int, created: int) -> None: ...


class UserImport:
    """One auth import: match everyone first, then stream the source in batches to the writer or the API."""

    def __init__(
        self,
        options: AuthOptions,
        report: AuthReport,
        writer: TargetWriter | None,
        changed_since: datetime | None = None,
        only_ids: Sequence[UUID] | None = None,
        changes: Changes | None = None,
        deleted_accounts: DeletedAccounts = (),
        progress: UserProgress | None = None,
        readers: Readers | None = None,
        odd_target: asyncio.Future[StoredOtherwise] | None = None,
    ) -> None:
        self.progress = progress
        self.odd_target = odd_target
        self.readers = readers
        self.changed_since = changed_since
        self.only_ids = only_ids
        self.changes = changes
        self.deleted_accounts = deleted_accounts
        self.options = options
        self.report = report
        self.writer = writer
        self.api: AdminApiCreator | None = None
        self.matches: dict[UUID, UserMatch] = {}
        self.claimed: dict[UUID, UUID] = {}

    async def run(self, source_conn: asyncpg.Connection) -> None:
        async with read_only_snapshot(
            source_conn, self.changed_since, self.only_ids, self.changes
        ) as snapshot:
            if self.api is None and self.writer is not None:
                await self._settled(snapshot, self.writer)
            else:
                keys = await snapshot.keys()
                self._total(len(keys))
                if keys:  # a catch-up with no changed user reads neither side's users again
                    await self._match(keys)
                    await self._import(_batches(snapshot, self.options.batch_size))
            self.report.not_copied = await snapshot.not_copied()

    def _total(self, users: int) -> None:
        self.report.source_users = users
        if self.progress is not None:
            self.progress.users_total(users)

    async def _settled(self, snapshot: SourceSnapshot, writer: TargetWriter) -> None:
        """The direct mode: matching settled on the target, plain creates by COPY, the rest in batches."""
        more = Lanes(writer.endpoint, self.readers)
        try:
            if self.readers is not None and self.changed_since is None and self.only_ids is None:
                # Every production user, most of them in groups: the other lanes open while the
                # matching is settled (a catch-up's few users seldom need them).
                more.open(self.options.jobs - 1)
            settled = await settle_users(snapshot, writer.conn, self.deleted_accounts, self.odd_target)
            self._total(settled.users)
            self.matches = settled.matches

            # The users the batches write (those the matcher decided, and the settled ones with a note)
            # go first on the first lane, while the other lanes write groups.
            def others() -> Awaitable[None]:
                return self._import(_batches_of(snapshot, settled.others(), settled, self.options.batch_size))

            refused = await self._groups(settled, CopyCreator(writer, snapshot), more, others)
        finally:
            await more.close()
        # A refused group goes through the batches, which isolate the users the target refuses.
        left = ((u, SAME_ID if g.matched else CREATED) for g in refused for u in g.ids)
        await self._import(_batches_of(snapshot, left, settled, self.options.batch_size))

    async def _groups(
        self, settled: Settled, creator: CopyCreator, more: Lanes, first: Callable[[], Awaitable[None]]
    ) -> list[Group]:
        """Write the settled users' groups by COPY, ``first`` on the first lane before any; the groups
        refused (all of them when the COPY path cannot be used)."""
        # Up to --jobs groups at once, each lane given a few (a lane that finishes first takes the next,
        # so the lanes end together), but no group smaller than a batch (a catch-up's few users are one
        # group, on the connections at hand). Read lazily: memory stays flat.
        created, same = len(settled.copied) // 16, len(settled.same) // 16
        lanes = self.options.jobs if self.readers is not None else 1
        share = -(-(created + same) // (lanes * GROUPS_PER_LANE))
        size = min(self.options.copy_size, max(self.options.batch_size, share))
        groups = chain(
            (Group(ids) for ids in settled.copied_ids(size)),
            (Group(ids, matched=True) for ids in settled.same_ids(size)),
        )
        if created + same and await creator.prepare():
            lanes = min(lanes, -(-created // size) + -(-same // size))
            return await write_groups(creator, groups, lanes, more, self._written_by_copy, first)
        await first()
        return list(groups)

    def _written_by_copy(self, group: Group) -> None:
        if self.progress is not None:
            self.progress.users(len(group.ids), 0 if group.matched else len(group.ids))

    async def _import(self, batches: AsyncIterator[Batch]) -> None:
        async for rows, identities in _read_ahead(batches):
            created = self.report.created
            if self.api is not None:
                await self._through_api(rows, identities)
            else:
                await self._direct(rows, identities)
            if self.progress is not None:
                self.progress.users(len(rows), self.report.created - created)

    async def _match(self, keys: list[SourceKey]) -> None:
        deleted = await deleted_ones(self.deleted_accounts)
        if self.writer is not None:
            id_map = await read_id_map(self.writer.conn, [k.id for k in keys])
            target = await read_target_keys(self.writer.conn, keys, id_map)
        else:
            assert self.api is not None
            target, id_map = await self.api.list_target(), {}
        for match in match_users(keys, target, id_map, deleted):
            self.matches[match.source_id] = match
            if match.target_id is not None and match.kind is not MatchKind.NEW:
                self.claimed[match.target_id] = match.source_id

    def _staged(
        self,
        row: asyncpg.Record,
        identities: Mapping[UUID, list[asyncpg.Record]],
        match: UserMatch,
        action: Literal["create", "update", "keep", "restore"] | None = None,
    ) -> StagedUser:
        if action is None:
            if match.kind is MatchKind.NEW:
                action = "create"
            else:
                action = "update" if self.options.policy is ConflictPolicy.SOURCE_WINS else "keep"
        return StagedUser(row, identities[row["id"]], match, action)

    async def _direct(
        self, rows: Sequence[asyncpg.Record], identities: Mapping[UUID, list[asyncpg.Record]]
    ) -> None:
        assert self.writer is not None
        staged = []
        for row in rows:
            match = self.matches.pop(row["id"])  # each user is met once: memory stays flat
            if match.kind is MatchKind.QUARANTINED:
                await self._quarantine(row, match.reason or "quarantined")
                continue
            self.report.notes.extend(direct_notes(row, match))
            staged.append(self._staged(row, identities, match))
        await self.writer.land(staged)

    async def _through_api(
        self, rows: Sequence[asyncpg.Record], identities: Mapping[UUID, list[asyncpg.Record]]
    ) -> None:
        assert self.api is not None
        from sync.auth.admin_api import ApiOutcome  # loaded with the admin API only

        to_create: list[tuple[asyncpg.Record, UserMatch]] = []
        staged: list[StagedUser] = []
        for row in rows:
            match = self.matches[row["id"]]
            if match.kind is MatchKind.QUARANTINED:
                await self._quarantine(row, match.reason or "quarantined")
            elif match.kind is not MatchKind.NEW:
                staged.append(self._staged(row, identities, match))
            elif (refusal := api_refusal(row, match)) is not None:
                await self._write_directly(row, identities, match, staged, refusal)
            else:
                to_create.append((row, match))
        for (row, match), result in zip(to_create, await self.api.create_all(to_create), strict=True):
            if result.outcome is ApiOutcome.QUARANTINED:
                await self._quarantine(row, result.reason or "refused by the admin API")
            elif result.outcome is ApiOutcome.DIRECT:
                await self._write_directly(
                    row, identities, match, staged, result.reason or "admin API failed"
                )
            elif result.outcome is ApiOutcome.MAPPED:
                mapped = replace(match, target_id=result.target_id, kind=result.kind)
                self.matches[row["id"]] = mapped
                staged.append(self._staged(row, identities, mapped))
            else:
                self.report.created += 1
                self.report.identities_created += len(
                    [v for v in (normal_email(row["email"]), normal_phone(row["phone"])) if v]
                )
                if self.writer is None:
                    self.report.notes.append(
                        UserNote(row["id"], row["id"], uncarried(row, identities[row["id"]]))
                    )
                else:
                    staged.append(self._staged(row, identities, match, "restore"))
        if self.writer is not None:
            await self.writer.land(staged)
        else:
            self._report_unwritten(staged)

    async def _write_directly(
        self,
        row: asyncpg.Record,
        identities: Mapping[UUID, list[asyncpg.Record]],
        match: UserMatch,
        staged: list[StagedUser],
        why: str,
    ) -> None:
        """A user the admin API cannot create: written by SQL when the target DSN is at hand."""
        if self.writer is None:
            await self._quarantine(row, f"{why}; give the target DSN to write it directly")
            return
        self.report.notes.append(UserNote(row["id"], row["id"], f"{why}; written directly in the database"))
        self.report.notes.extend(direct_notes(row, match))
        staged.append(self._staged(row, identities, match, "create"))

    def _report_unwritten(self, staged: Sequence[StagedUser]) -> None:
        """Without the target DSN, matched users are only reported: the admin API cannot set a hash."""
        for user in staged:
            kind = user.match.kind
            self.report.unchanged += 1
            if kind is MatchKind.ID:
                self.report.matched_by_id += 1
                continue
            if kind is MatchKind.EMAIL:
                self.report.matched_by_email += 1
            else:
                self.report.matched_by_phone += 1
            self.report.mapped.append(user.match)
            self.report.notes.append(
                UserNote(
                    user.row["id"],
                    user.match.target_id,
                    f"matched by {kind.value} but not updated: the admin API cannot replace a password hash "
                    "(give the target DSN)",
                )
            )

    async def _quarantine(self, row: asyncpg.Record, reason: str) -> None:
        if self.writer is not None:
            await self.writer.quarantine(row, reason)
            return
        self.report.quarantined += 1
        self.report.quarantine.append(QuarantinedUser(row["id"], row["email"], reason))


async def _batches(snapshot: SourceSnapshot, size: int) -> AsyncIterator[Batch]:
    """The source's users ``size`` at a time, each batch with its users' identities."""
    async for rows in snapshot.batches(size):
        yield await _with_identities(snapshot, rows)


async def _batches_of(
    snapshot: SourceSnapshot, entries: Iterable[tuple[UUID, bytes]], settled: Settled, size: int
) -> AsyncIterator[Batch]:
    """The users of ``entries`` (id, kind), ``size`` at a time, each batch with its users' identities;
    the matches of a batch's settled users are added to ``settled.matches`` as it is read."""
    entries = iter(entries)
    while chunk := list(islice(entries, size)):
        for user_id, kind in chunk:
            if kind != MATCHER:
                settled.matches[user_id] = settled.match(user_id, kind)
        yield await _with_identities(snapshot, await snapshot.rows([user_id for user_id, _ in chunk]))


async def _with_identities(snapshot: SourceSnapshot, rows: list[asyncpg.Record]) -> Batch:
    """A batch of these user rows, each with its identities."""
    identities: dict[UUID, list[asyncpg.Record]] = {row["id"]: [] for row in rows}
    for identity in await snapshot.identities(list(identities)):
        identities[identity["user_id"]].append(identity)
    return rows, identities


async def _read_ahead(batches: AsyncIterator[Batch]) -> AsyncIterator[Batch]:
    """``batches``, the next one read (on the source's connection) while the caller writes this one."""
    queue: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=1)

    async def produce() -> None:
        try:
            async for batch in batches:
                await queue.put(batch)
        finally:
            await queue.put(None)  # the end, or a failure the caller then meets awaiting this task

    producer = asyncio.create_task(produce())
    try:
        while (batch := await queue.get()) is not None:
            yield batch
        await producer  # its failure, if any
    finally:
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producer
