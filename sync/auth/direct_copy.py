"""Settled users by COPY: production's rows streamed straight into the target, never decoded in Python.

For the users matching settled as plain creates (:mod:`sync.auth.settle`), many at a time in one target
transaction: a binary ``COPY (SELECT …) TO STDOUT`` on the source feeds ``COPY … FROM STDIN`` into the
target's ``auth.users`` and ``auth.identities`` (both servers at work together), shaped on the source by the
same expressions the staged insert uses, then the ledger and the quarantine are written from the ids in
one statement each. Each value is cast on the source to the target column's type, so binary COPY reads it
as is. The users settled as same-id matches go the same way into the direct writer's stage tables, which
it then writes as it writes a batch. A group the target refuses (a trigger that raises, an identity whose
subject or id the target already has) is rolled back whole and goes through the staged batches, which
isolate the refused users. Up to ``--jobs`` groups are written at once, each on its own connections.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from uuid import UUID

import asyncpg

from sync.auth.columns import (
    DEFAULT_AUD,
    DEFAULT_ROLE,
    IDENTITIES_TABLE,
    IDENTITY_FIELDS,
    STAGED_FIELDS,
    USERS_TABLE,
)
from sync.auth.direct import REFUSALS, TargetWriter
from sync.auth.direct_sql import (
    IDENTITY_DATA,
    INSERT_EXPRESSIONS,
    LAND_CREATED,
    RESOLVE_CREATED,
    STAGE_IDENTITIES,
    STAGE_USER_FIELDS,
    STAGE_USERS,
)
from sync.auth.match import MatchKind
from sync.auth.options import ConflictPolicy
from sync.auth.source import SourceSnapshot
from sync.connect import Endpoint, connect
from sync.pipe import pipe_copy
from sync.retry import is_transient_db_error
from sync.sqltext import ident, inline

Readers = Callable[[], Awaitable[asyncpg.Connection | None]]
"""Opens another source connection reading in the import's snapshot; None when no other can join it."""

# Types by their names as both servers know them; a target column of another type turns this path off.
_COLUMN_TYPES = """
SELECT a.attname, format_type(a.atttypid, NULL) AS type,
       t.typnamespace = 'pg_catalog'::regnamespace AS builtin
FROM pg_attribute AS a JOIN pg_type AS t ON t.oid = a.atttypid
WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
"""
_QUARANTINED = "SELECT EXISTS (SELECT FROM _sync.quarantine WHERE table_name = $1 AND resolved_at IS NULL)"
# A created user's column from the stage-shaped source row ``s``: as the staged insert, with the default
# audience and role the stage record would have carried.
_USER_EXPRESSIONS = {
    **INSERT_EXPRESSIONS,
    "aud": f"coalesce(nullif(s.aud, ''), '{DEFAULT_AUD}')",
    "role": f"coalesce(nullif(s.role, ''), '{DEFAULT_ROLE}')",
}
# Its user's creation time, read only for an identity without times of its own (``coalesce`` stops at the
# first value): a join would hash every source user for each group.
_USER_CREATED = "(SELECT u.created_at FROM auth.users AS u WHERE u.id = i.user_id)"
# A created user's identity (``i``): as the staged insert writes one under its own id.
_IDENTITY_EXPRESSIONS = {
    "id": "coalesce(i.id, gen_random_uuid())",
    "provider_id": "i.provider_id",
    "user_id": "i.user_id",
    "identity_data": IDENTITY_DATA,
    "provider": "i.provider",
    "last_sign_in_at": "i.last_sign_in_at",
    "created_at": f"coalesce(i.created_at, {_USER_CREATED}, now())",
    "updated_at": f"coalesce(i.updated_at, i.created_at, {_USER_CREATED}, now())",
}


@dataclass(frozen=True)
class Group:
    """Users written together by COPY: created, or (``matched``) found on the target by their id."""

    ids: Sequence[UUID]
    matched: bool = False


def _casts(expressions: dict[str, str], types: dict[str, str], names: Sequence[str]) -> str:
    return ", ".join(f"({expressions[c]})::{types[c]} AS {ident(c)}" for c in names)


class CopyCreator:
    """Writes settled users by COPY from the source (created, or matched by id), through ``writer``'s
    connection and transactions."""

    def __init__(self, writer: TargetWriter, source: SourceSnapshot) -> None:
        self.writer = writer
        self.source = source
        self.reader = source.conn
        self._users: tuple[str, list[str]] = ("", [])
        self._identities: tuple[str, list[str]] = ("", [])
        self._staged_users = ""
        self._staged_identities = ""
        # Whether the target holds a user still in quarantine: a group's users can be earlier runs' only
        # (this run quarantines none of them before their group lands), so without one none is resolved.
        self._quarantined = True

    async def prepare(self) -> bool:
        """Build the source queries for this pair of servers; False when the path cannot be used (a
        target column of a type not built in, or a source from before identities had ``provider_id``)."""
        conn = self.writer.conn
        users = await conn.fetch(_COLUMN_TYPES, USERS_TABLE)
        identities = await conn.fetch(_COLUMN_TYPES, IDENTITIES_TABLE)
        self._quarantined = await conn.fetchval(_QUARANTINED, USERS_TABLE)
        if not all(r["builtin"] for r in [*users, *identities]):
            return False
        if "provider_id" not in self.source.identity_columns:
            return False
        user_types = {r["attname"]: r["type"] for r in users}
        names = [c for c in _USER_EXPRESSIONS if c in user_types]
        shaped = (
            "SELECT id AS source_id, id AS target_id, nullif(email::text, '') AS email_out, "
            f"nullif(phone::text, '') AS phone_out, {self.source.select(STAGED_FIELDS)} "
            f"FROM auth.users WHERE id = ANY ($1::uuid[])"
        )
        self._users = (f"SELECT {_casts(_USER_EXPRESSIONS, user_types, names)} FROM ({shaped}) AS s", names)
        # A same-id match's stage row, as StagedUser.record makes it ($2: the action).
        staged = ", ".join(
            _USER_EXPRESSIONS[n] if n in ("aud", "role") else f"s.{ident(n)}" for n, _ in STAGED_FIELDS
        )
        self._staged_users = (
            f"SELECT s.source_id, s.target_id, $2::text, '{MatchKind.ID.value}'::text, s.email_out, "
            f"s.phone_out, {staged} FROM ({shaped}) AS s"
        )
        # Their identities as the batches stage them; shaped for the created users.
        self._staged_identities = (
            f"SELECT {self.source.select(IDENTITY_FIELDS, identities=True)} FROM auth.identities "
            "WHERE user_id = ANY ($1::uuid[])"
        )
        identity_types = {r["attname"]: r["type"] for r in identities}
        names = [c for c in _IDENTITY_EXPRESSIONS if c in identity_types]
        casts = _casts(_IDENTITY_EXPRESSIONS, identity_types, names)
        self._identities = (f"SELECT {casts} FROM ({self._staged_identities}) AS i", names)
        return True

    def on(self, writer: TargetWriter, reader: asyncpg.Connection) -> CopyCreator:
        """The same statements through another target writer and another source reader (one that reads
        in the same snapshot), so that groups can be created at once."""
        other = copy.copy(self)
        other.writer, other.reader = writer, reader
        return other

    async def write(self, group: Group) -> bool:
        """Write ``group`` in one transaction; False when the target refused it (nothing written: the
        caller sends its users through the staged batches)."""
        try:
            if group.matched:
                await self.match_by_id(group.ids)
            else:
                await self.create(group.ids)
        except REFUSALS as exc:
            if is_transient_db_error(exc):
                raise
            return False
        return True

    async def match_by_id(self, ids: Sequence[UUID]) -> None:
        """Stage these same-id matches by COPY and write them as the direct writer writes a batch."""
        policy = self.writer.options.policy
        action = "update" if policy is ConflictPolicy.SOURCE_WINS else "keep"

        async def stage(conn: asyncpg.Connection) -> bool:
            columns = [n for n, _ in STAGE_USER_FIELDS]
            await pipe_copy(self.reader, self._staged_users, [ids, action], conn, STAGE_USERS, columns)
            columns = [n for n, _ in IDENTITY_FIELDS]
            return bool(
                await pipe_copy(self.reader, self._staged_identities, [ids], conn, STAGE_IDENTITIES, columns)
            )

        result = await self.writer.write_staged(
            stage, {action}, {MatchKind.ID}, f"matching {len(ids)} auth user(s) by id"
        )
        report = self.writer.report
        report.matched_by_id += len(ids)
        report.updated += len(result.updated)
        report.unchanged += len(ids) - len(result.updated)
        report.identities_created += result.identities

    async def create(self, ids: Sequence[UUID]) -> None:
        """Create these users and their identities in one transaction."""

        async def work(conn: asyncpg.Connection) -> tuple[int, int]:
            users = await pipe_copy(self.reader, self._users[0], [ids], conn, USERS_TABLE, self._users[1])
            identities = await pipe_copy(
                self.reader, self._identities[0], [ids], conn, IDENTITIES_TABLE, self._identities[1]
            )
            # The ids as literals (a group's are packed bytes): no UUID object made, no statement prepared.
            await conn.execute(inline(LAND_CREATED, [self.writer.run_id, USERS_TABLE, ids]))
            if self._quarantined:
                await conn.execute(inline(RESOLVE_CREATED, [USERS_TABLE, ids]))
            return users, identities

        users, identities = await self.writer.transaction(work, f"creating {len(ids)} auth user(s)")
        self.writer.report.created += users
        self.writer.report.identities_created += identities


Lane = tuple[asyncpg.Connection, asyncpg.Connection]
"""A source reader in the import's snapshot and a target connection: one more group written at a time."""


class Lanes:
    """The connections of the lanes after the first: opened ahead (:meth:`open`, while the matching is
    settled) or as a lane starts, and all closed by :meth:`close`, taken or not."""

    def __init__(self, endpoint: Endpoint, readers: Readers | None) -> None:
        self.endpoint = endpoint
        self.readers = readers
        self._ahead: list[asyncio.Task[Lane | None]] = []
        self._opened: list[asyncpg.Connection] = []

    def open(self, count: int) -> None:
        """Start opening ``count`` lanes for :meth:`take` to hand out."""
        self._ahead += [asyncio.create_task(self._lane()) for _ in range(count)]

    async def take(self) -> Lane | None:
        """A lane opened ahead, else a new one; None when no other reader can join the snapshot."""
        return await (self._ahead.pop(0) if self._ahead else self._lane())

    async def _lane(self) -> Lane | None:
        reader = await self.readers() if self.readers is not None else None
        if reader is None:
            return None
        self._opened.append(reader)
        conn = await connect(self.endpoint)
        self._opened.append(conn)
        return reader, conn

    async def close(self) -> None:
        """Close every connection the lanes opened."""
        await asyncio.gather(*self._ahead, return_exceptions=True)
        for conn in self._opened:
            await conn.close()


async def write_groups(
    creator: CopyCreator,
    groups: Iterable[Group],
    lanes: int,
    more: Lanes,
    written: Callable[[Group], None],
    first: Callable[[], Awaitable[None]] | None = None,
) -> list[Group]:
    """Write ``groups`` by COPY, up to ``lanes`` at once: the first lane on ``creator``'s connections (after
    ``first``, other work of those connections), each other on connections of its own (from ``more``,
    which closes them). ``written`` hears of each group that landed; returns the groups the target
    refused, in the order of ``groups`` (each group stands or falls alone, whatever the others do)."""
    queue = enumerate(groups)  # shared: each lane takes the next group when it is free
    refused: dict[int, Group] = {}

    async def lane(on: CopyCreator) -> None:
        for n, group in queue:
            if await on.write(group):
                written(group)
            else:
                refused[n] = group

    async def another_lane() -> None:
        opened = await more.take()
        if opened is None:
            return
        reader, conn = opened
        writer = creator.writer.on(conn)
        try:
            await lane(creator.on(writer, reader))
        finally:
            if writer.conn is not conn:
                await writer.conn.close()  # the writer's own, made after the lane's was lost

    async def first_lane() -> None:
        if first is not None:
            await first()
        await lane(creator)

    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(first_lane())
        for _ in range(lanes - 1):
            tasks.create_task(another_lane())
    return [refused[n] for n in sorted(refused)]
