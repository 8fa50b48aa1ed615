"""Matching at any scale: production's user keys staged on the target, and settled there in SQL where the
matcher could give only one answer, so a run holds no per-user object for most users.

The keys (creation time, id, e-mail, phone, SSO, deleted; whether the e-mail and phone are stored in normal
form and whether the password hash is a plain bcrypt one, both judged by production as it reads them) reach
a temporary table on the target by one binary COPY, passed through undecoded. A user is *settled* when no
rule of the matcher can touch it: its e-mail and phone are stored in normal form, no other production user
and no other target user has either of them (compared also with the normalised values of the few keys on
either side stored otherwise), and no earlier mapping, deleted account or mapping target involves its id.
Such a user is a same-id match (``id``) when the target has its id, else it is created (``new``); every
other user goes to :func:`~sync.auth.match.match_users` with the target users it can meet, as before.
The matcher over the remaining users gives them the same matches as over everyone: a settled user claims
no target user another could want and holds no address another has.

What comes back is a few byte strings: 16 bytes per user (its id), in production's order, one string for
the users created by COPY, one for those matched by id whose rows come by COPY, and one for every other
user with a kind byte after each id (about 17 bytes per user in all).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from uuid import UUID

import asyncpg

from sync.auth.columns import USERS_TABLE
from sync.auth.match import (
    PLAIN_EMAIL,
    PLAIN_PHONE,
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
from sync.auth.source import SourceSnapshot
from sync.pool import IdleConnections
from sync.sqltext import PackedIds

KEY_STAGE = "_sync_user_keys"
_ODD_STAGE = "_sync_odd_keys"

# Kinds of a user outside the COPY groups.
MATCHER, SAME_ID, CREATED = b"m", b"i", b"n"

_STAGE = f"""
CREATE TEMP TABLE {KEY_STAGE} (created_at timestamptz, id uuid, email text, phone text, plain_keys boolean,
                               sso boolean, deleted boolean, plain_hash boolean);
CREATE TEMP TABLE {_ODD_STAGE} (id uuid, email text, phone text)
"""
_ODD_SOURCE = f"SELECT id, email, phone, sso, deleted FROM {KEY_STAGE} WHERE NOT plain_keys"
_ODD_TARGET = (
    f"SELECT id, email, phone FROM auth.users WHERE email !~ '{PLAIN_EMAIL}' OR phone !~ '{PLAIN_PHONE}'"
)
# $1: deleted accounts, $2: the ``table_name`` of users. Each branch a join the planner hashes or probes by
# index; none an ``IN (subquery)`` under an OR. A user is left to the matcher when its own keys may meet
# another user's, or when the target user with its id may be another production user's candidate. An SSO
# target user is no one's candidate by e-mail (the matcher's rule), which also lets a few staged keys probe
# the e-mail index, partial on exactly that condition. A production key that meets another target user's
# unsettles both that production user and the one with the target user's id, from one join; the ids it
# gives that are no production user's (as the target users met by keys stored otherwise) settle nothing.
_PER_CONTACT = f"""
UNION SELECT k.id FROM {KEY_STAGE} AS k
      JOIN (SELECT {{c}} FROM {KEY_STAGE} GROUP BY {{c}} HAVING count(*) > 1) AS d ON d.{{c}} = k.{{c}}
UNION SELECT x.id FROM {KEY_STAGE} AS k JOIN auth.users AS t ON t.{{c}} = k.{{c}} AND t.id <> k.id{{sso}}
      CROSS JOIN LATERAL (VALUES (k.id), (t.id)) AS x (id)
UNION SELECT k.id FROM {KEY_STAGE} AS k JOIN {_ODD_STAGE} AS o ON o.{{c}} = k.{{c}}
UNION SELECT t.id FROM auth.users AS t JOIN {_ODD_STAGE} AS o ON o.{{c}} = t.{{c}}"""
_UNSETTLED = f"""
SELECT k.id FROM {KEY_STAGE} AS k
WHERE NOT k.plain_keys OR k.id = ANY ($1::text[]::uuid[])
UNION SELECT k.id FROM {KEY_STAGE} AS k
      JOIN _sync.id_map AS m ON m.table_name = $2 AND m.source_key = k.id::text
UNION SELECT k.id FROM {KEY_STAGE} AS k
      JOIN _sync.id_map AS m ON m.table_name = $2 AND m.target_key = k.id::text
UNION SELECT k.id FROM {KEY_STAGE} AS k JOIN {_ODD_STAGE} AS o ON o.id = k.id
{_PER_CONTACT.format(c="email", sso=" AND t.is_sso_user = false")}
{_PER_CONTACT.format(c="phone", sso="")}
"""

# A settled user with a plain hash (no note to make) goes in a COPY group: matched by id (``s``), or
# created (``c``) unless SSO; any other user is written by the batches, with its kind. The keys of the
# users left to the matcher come along, in production's order.
_KINDS = f"""
WITH unsettled AS MATERIALIZED ({_UNSETTLED}),
kinds AS (
    SELECT k.created_at, k.id, k.email, k.phone, k.sso, k.deleted,
           CASE WHEN x.id IS NOT NULL THEN '{MATCHER.decode()}'::bytea
                WHEN t.id IS NOT NULL AND k.plain_hash THEN 's'::bytea
                WHEN t.id IS NOT NULL THEN '{SAME_ID.decode()}'::bytea
                WHEN k.sso OR NOT k.plain_hash THEN '{CREATED.decode()}'::bytea
                ELSE 'c'::bytea END AS kind
    FROM {KEY_STAGE} AS k
    LEFT JOIN unsettled AS x ON x.id = k.id
    LEFT JOIN auth.users AS t ON t.id = k.id
)
SELECT string_agg(uuid_send(id), ''::bytea ORDER BY created_at, id) FILTER (WHERE kind = 'c') AS copied,
       string_agg(uuid_send(id), ''::bytea ORDER BY created_at, id) FILTER (WHERE kind = 's') AS same,
       string_agg(uuid_send(id) || kind, ''::bytea ORDER BY created_at, id)
           FILTER (WHERE kind NOT IN ('c', 's')) AS others,
       json_agg(json_build_array(id, email, phone, sso, deleted) ORDER BY created_at, id)
           FILTER (WHERE kind = '{MATCHER.decode()}') AS unsettled
FROM kinds
"""
_DROP = f"DROP TABLE IF EXISTS {KEY_STAGE}, {_ODD_STAGE}"
# A stage of at most this many keys (a catch-up's) is analysed, which reads it whole in a few ms: with its
# statistics the planner probes the target's indexes for each key instead of hashing every target user. A
# larger stage's size alone tells the planner to hash, and sampling it would cost more than it saves.
_ANALYSED_UP_TO = 10_000


@dataclass
class Settled:
    """Where each production user goes: created by COPY, or by the batches with their match."""

    copied: bytes
    """The ids (16 bytes each) of users created by COPY straight from production."""
    same: bytes
    """The ids of users matched by id whose stage rows come by COPY straight from production."""
    others_packed: bytes
    """The ids of every other user, each followed by its kind byte."""
    matches: dict[UUID, UserMatch]
    """The matcher's answer for the users SQL could not settle."""
    users: int
    """Every production user in scope."""

    def copied_ids(self, size: int) -> Iterator[PackedIds]:
        """The created-by-COPY ids, ``size`` at a time, in production's order."""
        return _chunks(self.copied, size)

    def same_ids(self, size: int) -> Iterator[PackedIds]:
        """The ids of the users matched by id through COPY, ``size`` at a time, in production's order."""
        return _chunks(self.same, size)

    def others(self) -> Iterator[tuple[UUID, bytes]]:
        """Every other user's id and kind byte, in production's order."""
        for start in range(0, len(self.others_packed), 17):
            yield (
                UUID(bytes=self.others_packed[start : start + 16]),
                self.others_packed[start + 16 : start + 17],
            )

    def match(self, user_id: UUID, kind: bytes) -> UserMatch:
        """The match of a user outside the COPY group, by its kind byte."""
        if kind == MATCHER:
            return self.matches[user_id]
        return UserMatch(user_id, user_id, MatchKind.ID if kind == SAME_ID else MatchKind.NEW)

    def all_matches(self, order: Sequence[UUID]) -> list[UserMatch]:
        """Every user's match in ``order`` (to compare with the matcher over everyone)."""
        kinds = dict(self.others())
        kinds.update((u, SAME_ID) for ids in self.same_ids(1000) for u in ids)
        return [self.match(u, kinds[u]) if u in kinds else UserMatch(u, u, MatchKind.NEW) for u in order]


def _chunks(packed: bytes, size: int) -> Iterator[PackedIds]:
    """The ids packed 16 bytes each, ``size`` at a time (still packed)."""
    step = 16 * size
    for start in range(0, len(packed), step):
        yield PackedIds(packed[start : start + step])


StoredOtherwise = list[tuple[UUID, str | None, str | None]]
"""Target users whose e-mail or phone is stored otherwise than in normal form: id, both as stored."""


async def stored_otherwise(conn: asyncpg.Connection) -> StoredOtherwise:
    """The target's users whose keys are stored otherwise (few; found by reading every user)."""
    return [(r["id"], r["email"], r["phone"]) for r in await conn.fetch(_ODD_TARGET)]


async def stored_otherwise_ahead(connections: IdleConnections) -> StoredOtherwise:
    """:func:`stored_otherwise` on a connection of ``connections``, given back after: a run reads them
    while the import reads production's user keys, so that settling does not wait for a read of every
    target user. The list is as old as that: a target user whose address changes after it is read is
    judged as it was then, as it would be if it changed while the groups are written."""
    conn = await connections.take()
    try:
        found = await stored_otherwise(conn)
    except BaseException:
        conn.terminate()
        raise
    connections.give_back(conn)
    return found


async def _stored_otherwise(
    target: asyncpg.Connection, ahead: asyncio.Future[StoredOtherwise] | None
) -> StoredOtherwise:
    if ahead is not None:
        try:
            return await ahead
        except Exception:
            pass  # read again here, where a failure is the import's own
    return await stored_otherwise(target)


async def settle_users(
    source: SourceSnapshot,
    target: asyncpg.Connection,
    deleted_accounts: DeletedAccounts = (),
    odd_target: asyncio.Future[StoredOtherwise] | None = None,
) -> Settled:
    """Stage ``source``'s keys on ``target``, settle what SQL can, match the rest; see the module. The
    deleted accounts are waited for once production's keys are staged, before any target user is read.
    ``odd_target``: the target's users stored otherwise, being read ahead (read here when that failed)."""
    await target.execute(f"{_DROP}; {_STAGE}")
    try:
        users = await source.copy_keys_to(target, KEY_STAGE)
        if not users:  # a catch-up with no changed user reads no target user
            return Settled(b"", b"", b"", {}, 0)
        if users <= _ANALYSED_UP_TO:
            await target.execute(f"ANALYZE {KEY_STAGE}")
        # Keys stored otherwise on either side (few), normalised here: production's without an id, the
        # target's with the id of their user.
        accounts = await deleted_ones(deleted_accounts)
        odd: list[tuple[UUID | None, str | None, str | None]]
        odd = [(None, r["email"], r["phone"]) for r in await target.fetch(_ODD_SOURCE)]
        odd += await _stored_otherwise(target, odd_target)
        await target.copy_records_to_table(
            _ODD_STAGE,
            records=[(i, normal_email(e), normal_phone(p)) for i, e, p in odd],
            columns=["id", "email", "phone"],
        )
        # Its statistics (a few rows, read at once) let the planner hash it rather than sort every key.
        await target.execute(f"ANALYZE {_ODD_STAGE}")
        row = await target.fetchrow(_KINDS, [str(u) for u in accounts], USERS_TABLE)
        keys = [
            SourceKey(UUID(i), normal_email(e), normal_phone(p), sso, deleted)
            for i, e, p, sso, deleted in json.loads(row["unsettled"] or "[]")
        ]
        id_map = await read_id_map(target, [k.id for k in keys])
        candidates = await read_target_keys(target, keys, id_map)
        matches = {m.source_id: m for m in match_users(keys, candidates, id_map, accounts)}
        return Settled(row["copied"] or b"", row["same"] or b"", row["others"] or b"", matches, users)
    finally:
        await target.execute(_DROP)
