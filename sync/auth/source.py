"""Reading production's auth users and identities: their matching keys, then full rows in batches."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from uuid import UUID

import asyncpg

from sync.auth.columns import (
    IDENTITIES_TABLE,
    IDENTITY_FIELDS,
    SOURCE_USER_FIELDS,
    USERS_TABLE,
    Fields,
    select_list,
    table_columns,
)
from sync.auth.match import PLAIN_EMAIL, PLAIN_PHONE, SourceKey, normal_email, normal_phone
from sync.auth.report import plain_hash_sql
from sync.pipe import pipe_copy
from sync.selection import Changes
from sync.sqltext import Params, ident, table_ident

_USERS = table_ident(USERS_TABLE)


def changed_users(
    columns: set[str], changed_since: datetime, changes: Changes | None, params: Params
) -> tuple[str, str | None]:
    """A catch-up's users, as conditions over ``auth.users`` and over ``auth.identities`` (alias ``i``;
    None without a span of transactions): the users created, changed or signed in since the last run's
    mark, and those whose row, or one of whose identities, a transaction wrote since its snapshot."""
    mark = params.bind(changed_since, "timestamptz")
    stamps = [c for c in ("created_at", "updated_at", "last_sign_in_at") if c in columns]
    changed = [f"{ident(c)} >= {mark}" for c in stamps]
    if changes is None:
        return "(" + " OR ".join(changed) + ")", None
    changed.append(changes.sql(params))
    held = list(changes.held.get(USERS_TABLE, []))
    if held:
        changed.append(f"id::text = ANY({params.bind(held, 'text[]')})")
    return "(" + " OR ".join(changed) + ")", changes.sql(params, "i.")


class SourceSnapshot:
    """The source's auth users, read in one READ ONLY REPEATABLE READ transaction: keys, then batches.

    The caller holds the transaction (:func:`read_only_snapshot` opens one) and calls :meth:`prepare`
    before anything else.
    """

    def __init__(
        self,
        conn: asyncpg.Connection,
        changed_since: datetime | None = None,
        only_ids: Sequence[UUID] | None = None,
        changes: Changes | None = None,
    ) -> None:
        self.conn = conn
        self.changed_since = changed_since
        self.only_ids = only_ids
        self.changes = changes
        self._user_columns: set[str] = set()
        self.identity_columns: set[str] = set()
        self._users_query = ""
        self._rows_query = ""
        self._identities_query = ""
        self._window = ""
        self._params: tuple[object, ...] = ()

    async def prepare(self) -> None:
        """Read the live column lists (the Auth version decides them) and build the queries."""
        self._user_columns = await table_columns(self.conn, USERS_TABLE)
        identities = await table_columns(self.conn, IDENTITIES_TABLE)
        self.identity_columns = identities
        params = Params()
        keyed = self.changes.keyed.get(USERS_TABLE) if self.changes is not None else None
        if self.changed_since is not None and keyed is not None:
            # The run's census listed them (few): read by primary key, no scan of users or identities.
            self._window = f" WHERE id = ANY({params.bind(list(keyed), 'text[]')}::uuid[])"
        elif self.changed_since is not None:
            users, touched = changed_users(self._user_columns, self.changed_since, self.changes, params)
            if touched is not None:
                # The ids first, as one array over a union, then the users by primary key: under an OR
                # the planner runs ``id IN (subquery)`` as a filter re-scanned for every user when it
                # cannot hash it, and as a semi-join it hashes every user even when no id comes back.
                self._window = (
                    f" WHERE id = ANY (ARRAY(SELECT id FROM {_USERS} WHERE {users} "
                    f"UNION SELECT i.user_id FROM {table_ident(IDENTITIES_TABLE)} AS i WHERE {touched}))"
                )
            else:
                self._window = f" WHERE {users}"
        if self.only_ids is not None:
            # A quarantine retry reads only the users still in quarantine.
            ids = params.bind(list(self.only_ids), "uuid[]")
            self._window += f"{' AND ' if self._window else ' WHERE '}id = ANY({ids})"
        self._params = tuple(params.values)
        self._users_query = (
            f"SELECT {select_list(SOURCE_USER_FIELDS, self._user_columns)} FROM {_USERS}{self._window} "
            "ORDER BY created_at, id"
        )
        self._rows_query = (
            f"SELECT {select_list(SOURCE_USER_FIELDS, self._user_columns)} FROM {_USERS} "
            "WHERE id = ANY($1::uuid[]) ORDER BY created_at, id"
        )
        identity_select = select_list(IDENTITY_FIELDS, identities)
        if "provider_id" not in identities:
            # Before Nov 2023 the provider's subject lived in identities.id (text); id is new since.
            identity_select = (
                "NULL::uuid AS id, id::text AS provider_id, user_id, identity_data, provider, "
                "last_sign_in_at, created_at, updated_at"
            )
        self._identities_query = (
            f"SELECT {identity_select} FROM {table_ident(IDENTITIES_TABLE)} "
            "WHERE user_id = ANY($1::uuid[]) ORDER BY created_at"
        )

    async def keys(self) -> list[SourceKey]:
        """Every source user's matching keys, oldest first."""
        sso, deleted = (
            ident(name) if name in self._user_columns else "NULL" for name in ("is_sso_user", "deleted_at")
        )
        rows = await self.conn.fetch(
            f"SELECT id, email, phone, coalesce({sso}, false) AS sso, {deleted} IS NOT NULL AS deleted "
            f"FROM {_USERS}{self._window} ORDER BY created_at, id",
            *self._params,
        )
        return [
            SourceKey(r["id"], normal_email(r["email"]), normal_phone(r["phone"]), r["sso"], r["deleted"])
            for r in rows
        ]

    async def copy_keys_to(self, target: asyncpg.Connection, table: str) -> int:
        """Every source user's matching keys streamed undecoded into ``table`` on ``target`` (creation time
        and id, which order them oldest first; e-mail and phone as stored, ``''`` as NULL; whether both are
        stored in normal form; SSO, deleted, and whether the password hash is none or a bcrypt one); how
        many. Production sorts nothing: the target orders the few lists it returns."""
        sso, deleted, password = (
            ident(name) if name in self._user_columns else "NULL"
            for name in ("is_sso_user", "deleted_at", "encrypted_password")
        )
        hash_text = f"coalesce({password}::text, '')"
        query = (
            "SELECT created_at::timestamptz, id, _email, _phone, "
            f"coalesce(_email ~ '{PLAIN_EMAIL}', true) AND coalesce(_phone ~ '{PLAIN_PHONE}', true), "
            f"coalesce({sso}, false), {deleted} IS NOT NULL, {plain_hash_sql(hash_text)} "
            f"FROM {_USERS} CROSS JOIN LATERAL "
            "(SELECT nullif(email::text, '') AS _email, nullif(phone::text, '') AS _phone) AS k"
            f"{self._window}"
        )
        return await pipe_copy(self.conn, query, self._params, target, table)

    def select(self, fields: Fields, *, identities: bool = False) -> str:
        """The select list of ``fields`` of ``auth.users`` (or ``auth.identities``) on this server."""
        return select_list(fields, self.identity_columns if identities else self._user_columns)

    async def rows(self, user_ids: Sequence[UUID]) -> list[asyncpg.Record]:
        """Full rows of these users, in the order of :meth:`keys`."""
        return await self.conn.fetch(self._rows_query, list(user_ids))

    async def batches(self, size: int) -> AsyncIterator[list[asyncpg.Record]]:
        """Full user rows, ``size`` at a time, in the order of :meth:`keys`."""
        cursor = await self.conn.cursor(self._users_query, *self._params)
        while rows := await cursor.fetch(size):
            yield rows

    async def identities(self, user_ids: Sequence[UUID]) -> list[asyncpg.Record]:
        """The identities of these users."""
        return await self.conn.fetch(self._identities_query, list(user_ids))

    async def not_copied(self) -> list[str]:
        """What per-user auth state stays behind, in words."""
        factors = 0
        if await self.conn.fetchval("SELECT to_regclass('auth.mfa_factors') IS NOT NULL"):
            factors = await self.conn.fetchval(
                "SELECT count(*) FROM auth.mfa_factors WHERE status::text = 'verified'"
            )
        lines = [
            "sessions, refresh tokens and one-time tokens are not copied: users sign in again on the target"
        ]
        if factors:
            lines.append(
                f"{factors} verified MFA factor(s) not copied: those users sign in with their password "
                "alone on the target and enrol again"
            )
        return lines


@asynccontextmanager
async def read_only_snapshot(
    conn: asyncpg.Connection,
    changed_since: datetime | None = None,
    only_ids: Sequence[UUID] | None = None,
    changes: Changes | None = None,
) -> AsyncIterator[SourceSnapshot]:
    """A :class:`SourceSnapshot` inside a READ ONLY REPEATABLE READ transaction on ``conn``.

    A ``conn`` already in a transaction (a run's reader, joined to the run's exported snapshot) is read
    in that transaction, so users and table rows come from the same instant.
    """
    snapshot = SourceSnapshot(conn, changed_since, only_ids, changes)
    if conn.is_in_transaction():
        await snapshot.prepare()
        yield snapshot
        return
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        await snapshot.prepare()
        yield snapshot


async def read_source_keys(conn: asyncpg.Connection) -> list[SourceKey]:
    """Every source user's matching keys, oldest first, in the transaction ``conn`` already holds."""
    snapshot = SourceSnapshot(conn)
    await snapshot.prepare()
    return await snapshot.keys()
