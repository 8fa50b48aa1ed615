"""Auth import: every production user exists on the target and signs in there with the same password.

Source users are matched against target users, then the missing ones are created and the matched ones
brought up to date, before any table row that references a user is copied.

Matching, in this order (emails compared as ``lower(trim(email))``, phones as digits without ``+``):

1. **Same id** — the user is present. Under ``source-wins`` (the default) its password hash, metadata,
   confirmation and sign-in times, ban, deletion and anonymity follow production; its e-mail and phone
   too, unless another user holds them (then the target's own are kept and a note says so).
   ``target-wins`` leaves matched users' values as they are. Under either policy a NULL the Auth server
   cannot read (an old import's NULL token, say) is repaired on every matched user: such a user cannot
   sign in at all.
2. **The id map** — a source user mapped by an earlier run keeps its target user.
3. **Same e-mail, then same phone, other id** — the person signed up again on the target. The source
   id maps to the target id in ``_sync.id_map`` (reason ``email``/``phone``) so that every row that
   references the user follows it, and the target user takes production's password hash, confirmation
   times and metadata (``source-wins``): the production password is the one the person knows. A source
   user without a hash (Google-only in production) leaves the target's hash alone; a confirmation time
   is never cleared.
4. **Otherwise created**, with its production id.

Special users:

- **Deleted** (``deleted_at`` set): matched by id only — a deleted account never takes over a live one
  by its address. Created with ``deleted_at`` kept so that production rows referencing it still land;
  when its e-mail or phone now belongs to a target user, it is created without them (noted).
- **Banned**: copied as any other user; ``banned_until`` is kept, so the ban holds on the target.
- **Anonymous**: they have neither e-mail nor phone, so they match by id only; created with
  ``is_anonymous`` kept (it becomes the JWT claim RLS policies test).
- **SSO** (``is_sso_user``): matched by id only, as the Auth server never finds them by e-mail; created
  with their ``sso:…`` identities. They sign in only if the target has the same SSO provider (noted;
  ``auth.sso_providers`` is project configuration and is not copied).
- **Two source users on one target user** (same address in different case, or one address on two
  accounts): a target user is matched by at most one source user. The earlier-created source user wins
  (a same-id match always wins); the other is quarantined with the reason, and so is a new user whose
  e-mail or phone was already taken by an earlier one in the same run.

Written as the Auth server needs it (``reference/supabase-auth.md`` §5): nil-UUID ``instance_id``,
``aud``/``role`` from the source or ``authenticated``, lower-cased e-mail, phone NULL rather than
``''``, ``''`` in the ten columns the server scans as strings (pending tokens are not carried, and their
``*_sent_at`` are NULL), ``email_change_confirm_status`` 0, non-NULL ``created_at``/``updated_at``,
generated columns never named. Every source identity is copied (OAuth ones with their ``provider_id``
and ``identity_data``; e-mail and phone ones re-derived to the target id when remapped; e-mail lower-cased
in ``identity_data``), skipping a (provider_id, provider) the target already has, and a user with an
e-mail but no e-mail identity gets one. MFA factors, sessions, refresh tokens and one-time tokens are
not copied: users sign in again, and MFA users enrol again (``include_mfa`` is not available yet).

Two modes:

- ``direct``: set-based batches in one target transaction each — the batch is staged with binary COPY
  into temporary tables, then ``INSERT … SELECT`` / ``UPDATE … FROM`` into ``auth.users`` and
  ``auth.identities``, the id map and the quarantine. A batch the database refuses (a trigger that
  raises, a constraint) is split in halves until the refused users are isolated; they go to
  ``_sync.quarantine`` with the database's message and the rest lands. Triggers on ``auth.users`` fire
  (the signup trigger makes a ``profiles`` row, which the copy stage completes) unless ``triggers =
  "skip"``, which runs each batch under ``SET LOCAL session_replication_role = replica`` and then
  checks the references of what it wrote itself, as foreign keys are not checked then.
- ``admin-api``: each missing user is created through the Auth admin API (the ``supabase`` client) with
  its id, e-mail/phone, password hash, confirmation flags and metadata; bounded concurrency, retries
  with backoff for 429/5xx/timeouts, a lookup by id before every retry (a timeout may hide a create that
  landed); an "e-mail exists" answer is resolved by finding the holder and mapping to it (or
  quarantining the user when only another user's identity carries the address). What the API cannot
  carry (original timestamps, confirmation times, OAuth identities, the exact ban, ``deleted_at``) and
  the users it cannot create (anonymous, SSO, an unsupported hash) are written directly when a target
  DSN is also given, else reported per user; so is a user whose create keeps failing with a 500, whose
  cause (often a trigger) the API hides: the direct write lands it or quarantines it with the
  database's message. Without a target DSN nothing is written but through the API (no id map, no
  quarantine table: the report carries both).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any, Literal
from uuid import UUID

import asyncpg
import httpx
from psycopg import sql
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, computed_field
from supabase import AsyncClientOptions, acreate_client
from supabase_auth.errors import AuthApiError, AuthError, AuthRetryableError, AuthUnknownError

from sync.connect import Endpoint, connect
from sync.errors import EXIT_OK, EXIT_QUARANTINED, SyncError, UsageError
from sync.retry import (
    DEFAULT_ATTEMPTS,
    DEFAULT_INITIAL_WAIT,
    DEFAULT_MAX_WAIT,
    is_transient_db_error,
    retrying,
)
from sync.state import ensure_state

USERS_TABLE = "auth.users"
"""``table_name`` of users in ``_sync.id_map`` and ``_sync.quarantine``."""
NIL_UUID = UUID(int=0)
DEFAULT_AUD = "authenticated"
DEFAULT_ROLE = "authenticated"

# The columns the Auth server scans into Go strings: a NULL in any of them makes the user's login
# answer 500 "Database error querying schema" (reference §2.2).
STRING_COLUMNS = (
    "aud",
    "role",
    "confirmation_token",
    "recovery_token",
    "email_change_token_new",
    "email_change",
    "email_change_token_current",
    "phone_change",
    "phone_change_token",
    "reauthentication_token",
)
# Pending-token state is not carried (one_time_tokens are not copied): '' for tokens, NULL for times.
_TOKEN_COLUMNS = STRING_COLUMNS[2:]
_SENT_AT_COLUMNS = (
    "confirmation_sent_at",
    "recovery_sent_at",
    "email_change_sent_at",
    "phone_change_sent_at",
    "reauthentication_sent_at",
)

# What the stage keeps of a source user, with the type it is staged as (besides id, e-mail, phone).
_STAGED_FIELDS: tuple[tuple[str, str], ...] = (
    ("aud", "text"),
    ("role", "text"),
    ("encrypted_password", "text"),
    ("email_confirmed_at", "timestamptz"),
    ("invited_at", "timestamptz"),
    ("last_sign_in_at", "timestamptz"),
    ("raw_app_meta_data", "jsonb"),
    ("raw_user_meta_data", "jsonb"),
    ("is_super_admin", "boolean"),
    ("created_at", "timestamptz"),
    ("updated_at", "timestamptz"),
    ("phone_confirmed_at", "timestamptz"),
    ("banned_until", "timestamptz"),
    ("is_sso_user", "boolean"),
    ("deleted_at", "timestamptz"),
    ("is_anonymous", "boolean"),
)
_SOURCE_USER_FIELDS: tuple[tuple[str, str], ...] = (
    ("id", "uuid"),
    ("email", "text"),
    ("phone", "text"),
    *_STAGED_FIELDS,
)
# How a staged user is routed: one row per user in the batch.
_ROUTING_FIELDS: tuple[tuple[str, str], ...] = (
    ("source_id", "uuid"),
    ("target_id", "uuid"),
    ("action", "text"),
    ("kind", "text"),
    ("email_out", "text"),
    ("phone_out", "text"),
)
_IDENTITY_FIELDS: tuple[tuple[str, str], ...] = (
    ("id", "uuid"),
    ("provider_id", "text"),
    ("user_id", "uuid"),
    ("identity_data", "jsonb"),
    ("provider", "text"),
    ("last_sign_in_at", "timestamptz"),
    ("created_at", "timestamptz"),
    ("updated_at", "timestamptz"),
)
_STAGE_USERS = "_sync_stage_users"
_STAGE_IDENTITIES = "_sync_stage_identities"

_BCRYPT = re.compile(r"\$2[aby]?\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
_ARGON2 = re.compile(r"\$argon2(i|id)\$v=19\$m=\d+,t=\d+,p=\d+\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+")
_FBSCRYPT = re.compile(r"\$fbscrypt\$v=1,n=\d+,r=\d+,p=\d+(,ss=[^,$]*)?(,sk=[^,$]*)?\$[^$]+\$[^$]+")


# ------------------------------------------------------------------------------------ options, results


class AuthMode(StrEnum):
    DIRECT = "direct"
    ADMIN_API = "admin-api"


class ConflictPolicy(StrEnum):
    SOURCE_WINS = "source-wins"
    TARGET_WINS = "target-wins"


class TriggerMode(StrEnum):
    FIRE = "fire"
    SKIP = "skip"


class AuthOptions(BaseModel):
    """How the auth import runs; the mapping file and the command line fill it."""

    model_config = ConfigDict(frozen=True)

    mode: AuthMode = AuthMode.DIRECT
    policy: ConflictPolicy = ConflictPolicy.SOURCE_WINS
    triggers: TriggerMode = TriggerMode.FIRE
    batch_size: int = Field(default=2000, ge=1, description="users per target transaction")
    concurrency: int = Field(default=8, ge=1, description="admin-api: requests in flight at once")
    include_mfa: bool = Field(default=False, description="copy mfa_factors too (not available yet)")
    retry_attempts: int = Field(default=DEFAULT_ATTEMPTS, ge=1)
    retry_initial_wait: float = Field(default=DEFAULT_INITIAL_WAIT, ge=0)
    retry_max_wait: float = Field(default=DEFAULT_MAX_WAIT, ge=0)


class AdminApi(BaseModel):
    """Where the admin API is: the project URL and the service-role key (never printed)."""

    model_config = ConfigDict(frozen=True)

    url: str
    service_role_key: SecretStr
    # Longer than the Auth server's own 10 s request limit: a slow create then answers instead of
    # leaving the client to guess whether it landed.
    timeout: float = Field(default=15.0, gt=0)


class MatchKind(StrEnum):
    ID = "id"
    EMAIL = "email"
    PHONE = "phone"
    NEW = "new"
    QUARANTINED = "quarantined"


@dataclass(frozen=True, slots=True)
class UserMatch:
    """What became of one source user: its target user, how it was found, or why it was set aside."""

    source_id: UUID
    target_id: UUID | None
    kind: MatchKind
    reason: str | None = None
    """Why the user was quarantined, or which of its production addresses another user holds."""
    keep_email: bool = True
    """False when production's e-mail is not written because another user holds it: a deleted user is
    created without it, a matched user keeps the target's own."""
    keep_phone: bool = True
    """The same for the phone."""


@dataclass(frozen=True, slots=True)
class UserNote:
    """Something about one user that could not be carried, or that the operator should know."""

    source_id: UUID
    target_id: UUID | None
    note: str


@dataclass(frozen=True, slots=True)
class QuarantinedUser:
    """A source user that did not land, with the reason (the database's message when it refused)."""

    source_id: UUID
    email: str | None
    error: str
    sqlstate: str | None = None


class AuthReport(BaseModel):
    """What the auth import did: what ``sync run`` prints and ``--json`` emits."""

    mode: AuthMode
    policy: ConflictPolicy
    triggers: TriggerMode
    source_users: int = 0
    created: int = 0
    matched_by_id: int = 0
    matched_by_email: int = 0
    matched_by_phone: int = 0
    updated: int = 0
    unchanged: int = 0
    quarantined: int = 0
    identities_created: int = 0
    email_identities_added: int = 0
    mapped: list[UserMatch] = Field(default_factory=list)
    quarantine: list[QuarantinedUser] = Field(default_factory=list)
    notes: list[UserNote] = Field(default_factory=list)
    not_copied: list[str] = Field(default_factory=list)
    seconds: float = 0.0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def users_per_second(self) -> float:
        return round(self.source_users / self.seconds, 1) if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """0 when every user landed, 3 when some were quarantined."""
        return EXIT_QUARANTINED if self.quarantined else EXIT_OK

    def summary(self, shown: int = 20) -> list[str]:
        """The report in a few lines of text, listing at most ``shown`` notes and quarantined users."""
        lines = [
            f"auth import ({self.mode}, {self.policy}, triggers {self.triggers}): {self.source_users:,} "
            f"production users in {self.seconds:.1f} s ({self.users_per_second:,.0f} users/s)",
            f"  created {self.created:,} · matched by id {self.matched_by_id:,}, by e-mail "
            f"{self.matched_by_email:,}, by phone {self.matched_by_phone:,} · updated {self.updated:,} "
            f"· unchanged {self.unchanged:,} · quarantined {self.quarantined:,}",
            f"  identities created {self.identities_created:,} "
            f"({self.email_identities_added:,} e-mail identities added)",
        ]
        lines += [f"  not copied: {line}" for line in self.not_copied]
        sections = (
            ("Notes", [f"{n.source_id}: {n.note}" for n in self.notes]),
            (
                "Quarantined (see _sync.quarantine on the target)",
                [f"{q.source_id} ({q.email or 'no e-mail'}): {q.error}" for q in self.quarantine],
            ),
        )
        for title, items in sections:
            if items:
                lines.append(f"{title} ({len(items):,}):")
                lines += [f"  - {item}" for item in items[:shown]]
                if len(items) > shown:
                    lines.append(f"  … and {len(items) - shown:,} more (--json lists them all)")
        return lines


# ------------------------------------------------------------------------------------------- matching


def normal_email(email: str | None) -> str | None:
    """The e-mail as logins compare it (lower-cased, trimmed); None for none."""
    value = (email or "").strip().lower()
    return value or None


def normal_phone(phone: str | None) -> str | None:
    """The phone as the Auth server stores it (no ``+``, no spaces); None for none."""
    value = re.sub(r"[\s+]", "", phone or "")
    return value or None


@dataclass(frozen=True, slots=True)
class SourceKey:
    """A source user as matching sees it."""

    id: UUID
    email: str | None
    phone: str | None
    is_sso_user: bool = False
    deleted: bool = False


@dataclass(frozen=True, slots=True)
class TargetKey:
    """A target user as matching sees it; ``exact_email`` means stored exactly as normalised."""

    id: UUID
    email: str | None
    phone: str | None
    is_sso_user: bool = False
    exact_email: bool = True
    created_at: datetime | None = None


def match_users(
    source: Sequence[SourceKey],
    target: Iterable[TargetKey],
    id_map: Mapping[UUID, tuple[UUID, str]] | None = None,
) -> list[UserMatch]:
    """Match each source user (given oldest first) to at most one target user; see the module rules.

    ``id_map`` holds earlier runs' decisions (source id → target id, reason). Returns one
    :class:`UserMatch` per source user, in the order given.
    """
    return _Matcher(list(target), id_map or {}).run(source)


class _Matcher:
    def __init__(self, target: list[TargetKey], id_map: Mapping[UUID, tuple[UUID, str]]) -> None:
        self.by_id = {t.id: t for t in target}
        self.by_email: dict[str, TargetKey] = {}
        # Among case variants of one address, the row stored lower-case wins, then the oldest.
        for t in sorted(
            target, key=lambda t: (not t.exact_email, t.created_at or datetime.max.replace(tzinfo=UTC))
        ):
            if t.email and not t.is_sso_user:
                self.by_email.setdefault(t.email, t)
        self.by_phone = {t.phone: t for t in target if t.phone}
        self.id_map = id_map
        self.claimed: dict[UUID, UUID] = {}  # target id -> the source id that matched it
        # Who holds each address once this run is done: target users, then the users it creates
        # or moves to a new address. An address is never given to a second user.
        self.email_holder = {e: f"target user {t.id}" for e, t in self.by_email.items()}
        self.phone_holder = {p: f"target user {t.id}" for p, t in self.by_phone.items()}

    def run(self, source: Sequence[SourceKey]) -> list[UserMatch]:
        matches: dict[UUID, UserMatch] = {}
        for s in source:  # a same-id match claims its target user before anyone else may
            if s.id in self.by_id:
                matches[s.id] = self._claim(s, self.by_id[s.id], MatchKind.ID, "id")
        for s in source:
            if s.id not in matches:
                matches[s.id] = self._match(s)
        return [matches[s.id] for s in source]

    def _match(self, s: SourceKey) -> UserMatch:
        prior = self.id_map.get(s.id)
        if prior is not None and prior[0] in self.by_id:
            kind = MatchKind.PHONE if prior[1] == MatchKind.PHONE else MatchKind.EMAIL
            return self._claim(s, self.by_id[prior[0]], kind, "mapping from an earlier run")
        if not s.is_sso_user and not s.deleted:
            if s.email and s.email in self.by_email:
                return self._claim(s, self.by_email[s.email], MatchKind.EMAIL, f"e-mail {s.email}")
            if s.phone and s.phone in self.by_phone:
                return self._claim(s, self.by_phone[s.phone], MatchKind.PHONE, f"phone {s.phone}")
        return self._create(s)

    def _claim(self, s: SourceKey, t: TargetKey, kind: MatchKind, via: str) -> UserMatch:
        other = self.claimed.get(t.id)
        if other is not None:
            return UserMatch(
                s.id,
                None,
                MatchKind.QUARANTINED,
                f"its {via} leads to target user {t.id}, already matched to production user {other}: "
                "two production users would share one account; merge or change one of them, then rerun",
            )
        self.claimed[t.id] = s.id
        # Production may have moved the person to another address: it follows unless someone holds it.
        email_holder = None if s.is_sso_user else self._take(self.email_holder, s.email, t.email, s.id)
        phone_holder = self._take(self.phone_holder, s.phone, t.phone, s.id)
        kept = _held_contacts(s, email_holder, phone_holder)
        return UserMatch(
            s.id,
            t.id,
            kind,
            f"production's {kept} not applied, the target's own kept" if kept else None,
            keep_email=email_holder is None,
            keep_phone=phone_holder is None,
        )

    def _create(self, s: SourceKey) -> UserMatch:
        email_holder = None if s.is_sso_user else self._take(self.email_holder, s.email, None, s.id)
        phone_holder = self._take(self.phone_holder, s.phone, None, s.id)
        taken = _held_contacts(s, email_holder, phone_holder)
        if taken and not s.deleted:
            return UserMatch(
                s.id,
                None,
                MatchKind.QUARANTINED,
                f"its {taken}: two production users share it; merge or change one of them, then rerun",
            )
        return UserMatch(
            s.id,
            s.id,
            MatchKind.NEW,
            f"deleted in production; created without its {taken}" if taken else None,
            keep_email=email_holder is None,
            keep_phone=phone_holder is None,
        )

    @staticmethod
    def _take(holders: dict[str, str], value: str | None, current: str | None, source_id: UUID) -> str | None:
        """Give ``value`` to ``source_id`` unless someone else holds it; returns that holder, if any."""
        if not value or value == current:
            return None
        holder = holders.get(value)
        if holder is None:
            holders[value] = f"production user {source_id}"
        return holder


def _held_contacts(s: SourceKey, email_holder: str | None, phone_holder: str | None) -> str:
    """``e-mail x (held by …) and phone y (held by …)`` for the addresses someone else holds."""
    return " and ".join(
        f"{what} (held by {holder})"
        for what, holder in ((f"e-mail {s.email}", email_holder), (f"phone {s.phone}", phone_holder))
        if holder
    )


# ------------------------------------------------------------------------------------------ reading


def _select_list(fields: Sequence[tuple[str, str]], present: set[str]) -> sql.Composed:
    """``col::type AS col`` for each field, ``NULL::type`` for the ones this server's table lacks."""
    return sql.SQL(", ").join(
        sql.SQL("{}::{} AS {}").format(
            sql.Identifier(name) if name in present else sql.SQL("NULL"), sql.SQL(kind), sql.Identifier(name)
        )
        for name, kind in fields
    )


async def _columns(conn: asyncpg.Connection, table: str, *, writable: bool = False) -> set[str]:
    """The column names of ``table``; with ``writable``, without generated columns."""
    rows = await conn.fetch(
        "SELECT attname FROM pg_attribute WHERE attrelid = $1::regclass AND attnum > 0 "
        "AND NOT attisdropped AND (NOT $2 OR attgenerated = '')",
        table,
        writable,
    )
    return {r["attname"] for r in rows}


class SourceSnapshot:
    """The source's auth users, read in one READ ONLY REPEATABLE READ transaction: keys, then batches."""

    def __init__(self, conn: asyncpg.Connection, changed_since: datetime | None = None) -> None:
        self.conn = conn
        self.changed_since = changed_since
        self._user_columns: set[str] = set()
        self._users_query = ""
        self._identities_query = ""
        self._window = sql.SQL("")
        self._params: tuple[datetime, ...] = ()

    async def prepare(self) -> None:
        """Read the live column lists (the Auth version decides them) and build the queries."""
        self._user_columns = await _columns(self.conn, USERS_TABLE)
        identities = await _columns(self.conn, "auth.identities")
        if self.changed_since is not None:
            # A catch-up reads only the users created, changed or signed in since the last run's mark.
            stamps = [c for c in ("created_at", "updated_at", "last_sign_in_at") if c in self._user_columns]
            self._window = sql.SQL(" WHERE ") + sql.SQL(" OR ").join(
                sql.SQL("{} >= $1").format(sql.Identifier(c)) for c in stamps
            )
            self._params = (self.changed_since,)
        self._users_query = (
            sql.SQL("SELECT {} FROM auth.users{} ORDER BY created_at, id")
            .format(_select_list(_SOURCE_USER_FIELDS, self._user_columns), self._window)
            .as_string()
        )
        identity_select = _select_list(_IDENTITY_FIELDS, identities)
        if "provider_id" not in identities:
            # Before Nov 2023 the provider's subject lived in identities.id (text); id is new since.
            identity_select = sql.SQL(
                "NULL::uuid AS id, id::text AS provider_id, user_id, identity_data, provider, "
                "last_sign_in_at, created_at, updated_at"
            )
        self._identities_query = (
            sql.SQL("SELECT {} FROM auth.identities WHERE user_id = ANY($1::uuid[]) ORDER BY created_at")
            .format(identity_select)
            .as_string()
        )

    async def keys(self) -> list[SourceKey]:
        """Every source user's matching keys, oldest first."""
        query = sql.SQL(
            "SELECT id, email, phone, coalesce({}, false) AS sso, {} IS NOT NULL AS deleted "
            "FROM auth.users{} ORDER BY created_at, id"
        ).format(
            *(
                sql.Identifier(name) if name in self._user_columns else sql.SQL("NULL")
                for name in ("is_sso_user", "deleted_at")
            ),
            self._window,
        )
        rows = await self.conn.fetch(query.as_string(), *self._params)
        return [
            SourceKey(r["id"], normal_email(r["email"]), normal_phone(r["phone"]), r["sso"], r["deleted"])
            for r in rows
        ]

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
    conn: asyncpg.Connection, changed_since: datetime | None = None
) -> AsyncIterator[SourceSnapshot]:
    """A :class:`SourceSnapshot` inside a READ ONLY REPEATABLE READ transaction on ``conn``."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        snapshot = SourceSnapshot(conn, changed_since)
        await snapshot.prepare()
        yield snapshot


async def read_target_keys(conn: asyncpg.Connection) -> list[TargetKey]:
    """Every target user's matching keys."""
    rows = await conn.fetch(
        "SELECT id, email, phone, coalesce(is_sso_user, false) AS sso, created_at FROM auth.users"
    )
    return [
        TargetKey(
            r["id"],
            normal_email(r["email"]),
            normal_phone(r["phone"]),
            r["sso"],
            exact_email=r["email"] == normal_email(r["email"]),
            created_at=r["created_at"],
        )
        for r in rows
    ]


async def read_id_map(conn: asyncpg.Connection) -> dict[UUID, tuple[UUID, str]]:
    """Earlier runs' user mappings (source id → target id, reason)."""
    rows = await conn.fetch(
        "SELECT source_key, target_key, reason FROM _sync.id_map WHERE table_name = $1", USERS_TABLE
    )
    return {UUID(r["source_key"]): (UUID(r["target_key"]), r["reason"]) for r in rows}


# ----------------------------------------------------------------------------------------- preflight

_TARGET_PRIVILEGES = (
    (USERS_TABLE, "SELECT"),
    (USERS_TABLE, "INSERT"),
    (USERS_TABLE, "UPDATE"),
    ("auth.identities", "SELECT"),
    ("auth.identities", "INSERT"),
    ("auth.identities", "UPDATE"),
)
_SOURCE_PRIVILEGES = ((USERS_TABLE, "SELECT"), ("auth.identities", "SELECT"))


async def check_privileges(
    conn: asyncpg.Connection, side: str, needed: Sequence[tuple[str, str]], hint: str = ""
) -> None:
    """Raise one UsageError line naming every privilege ``side``'s role lacks on the auth tables.

    Row level security counts too: it is on for the auth tables, with no policies, so a role that
    neither owns them nor bypasses RLS reads no rows and writes none. ``hint`` ends the line with
    another way out (e.g. the admin-API mode).
    """
    rows = await conn.fetch(
        "SELECT x.name, x.privilege, to_regclass(x.name) IS NOT NULL AS present, "
        "CASE WHEN to_regclass(x.name) IS NULL THEN false "
        "ELSE has_table_privilege(x.name, x.privilege) END AS granted, "
        "coalesce((SELECT c.relrowsecurity AND NOT pg_has_role(c.relowner, 'USAGE') "
        "          FROM pg_class AS c WHERE c.oid = to_regclass(x.name)), false) AS rls "
        "FROM unnest($1::text[], $2::text[]) AS x(name, privilege)",
        [name for name, _ in needed],
        [privilege for _, privilege in needed],
    )
    role = await conn.fetchrow(
        "SELECT current_user AS name, rolsuper OR rolbypassrls AS bypass FROM pg_roles "
        "WHERE rolname = current_user"
    )
    missing_tables = sorted({r["name"] for r in rows if not r["present"]})
    if missing_tables:
        raise UsageError(
            f"The {side} database has no {', '.join(missing_tables)}: is it a Supabase project's database?"
        )
    lacking = [f"{r['privilege']} on {r['name']}" for r in rows if not r["granted"]]
    if lacking:
        raise UsageError(
            f"The {side} role {role['name']!r} lacks {', '.join(lacking)}: connect as the project's "
            f"postgres role or grant them{hint}."
        )
    if not role["bypass"] and any(r["rls"] for r in rows):
        raise UsageError(
            f"The {side} role {role['name']!r} is subject to row level security on the auth tables "
            "(it would see no users): connect as the project's postgres role, which bypasses RLS."
        )


async def check_trigger_skip(conn: asyncpg.Connection) -> None:
    """Raise a UsageError when the target refuses ``SET LOCAL session_replication_role = replica``."""
    user = await conn.fetchval("SELECT current_user")
    transaction = conn.transaction()
    await transaction.start()
    try:
        await conn.execute("SET LOCAL session_replication_role = replica")
    except asyncpg.InsufficientPrivilegeError:
        raise UsageError(
            f"The target refuses SET session_replication_role for role {user!r} (needed to skip triggers; "
            'hosted Supabase allows it to postgres): set triggers = "fire", or connect as a role '
            "allowed to set it."
        ) from None
    finally:
        await transaction.rollback()


# ----------------------------------------------------------------------------------- direct writing


class _MissingReference(Exception):
    """What the tool wrote refers to a user that is not there (checked when FK triggers are off)."""

    sqlstate = "23503"


@dataclass(slots=True)
class StagedUser:
    """One source user on its way into a batch: the row, its identities, its match and the action."""

    row: asyncpg.Record
    identities: list[asyncpg.Record]
    match: UserMatch
    action: Literal["create", "update", "keep", "restore"]

    def routing(self) -> tuple[Any, ...]:
        m = self.match
        return (
            self.row["id"],
            m.target_id,
            self.action,
            m.kind.value,
            normal_email(self.row["email"]) if m.keep_email else None,
            normal_phone(self.row["phone"]) if m.keep_phone else None,
        )

    def record(self) -> tuple[Any, ...]:
        return (*self.routing(), *(self.row[name] for name, _ in _STAGED_FIELDS))


@dataclass
class BatchResult:
    """What one committed batch changed."""

    created: int = 0
    updated: set[UUID] = field(default_factory=set)
    identities: int = 0
    email_identities: int = 0


# SQL expressions (over the stage row ``s``) for each auth.users column of a created user.
_OBJECT = "CASE WHEN jsonb_typeof(s.{0}) = 'object' THEN s.{0} END"
_INSERT_EXPRESSIONS: dict[str, str] = {
    "instance_id": "'00000000-0000-0000-0000-000000000000'::uuid",
    "id": "s.target_id",
    "aud": f"coalesce(nullif(s.aud, ''), '{DEFAULT_AUD}')",
    "role": f"coalesce(nullif(s.role, ''), '{DEFAULT_ROLE}')",
    "email": "s.email_out",
    # '' rather than NULL: Auth servers before mid-2024 scanned the hash into a plain string.
    "encrypted_password": "coalesce(s.encrypted_password, '')",
    "email_confirmed_at": "s.email_confirmed_at",
    "invited_at": "s.invited_at",
    "last_sign_in_at": "s.last_sign_in_at",
    # GoTrue keeps provider/providers here; a user without them gets what a signup would have written.
    "raw_app_meta_data": "coalesce("
    + _OBJECT.format("raw_app_meta_data")
    + ", CASE WHEN s.email_out IS NOT NULL THEN jsonb_build_object('provider', 'email', 'providers', "
    "jsonb_build_array('email')) WHEN s.phone_out IS NOT NULL THEN jsonb_build_object('provider', 'phone', "
    "'providers', jsonb_build_array('phone')) ELSE jsonb_build_object() END)",
    "raw_user_meta_data": "coalesce(" + _OBJECT.format("raw_user_meta_data") + ", jsonb_build_object())",
    "is_super_admin": "s.is_super_admin",
    "created_at": "coalesce(s.created_at, now())",
    "updated_at": "coalesce(s.updated_at, s.created_at, now())",
    "phone": "s.phone_out",
    "phone_confirmed_at": "s.phone_confirmed_at",
    "email_change_confirm_status": "0",
    "banned_until": "s.banned_until",
    "is_sso_user": "coalesce(s.is_sso_user, false)",
    "deleted_at": "s.deleted_at",
    "is_anonymous": "coalesce(s.is_anonymous, false)",
    **{name: "''" for name in _TOKEN_COLUMNS},
    **{name: "NULL" for name in _SENT_AT_COLUMNS},
}
# Any matched user, whatever the policy: a NULL the Auth server cannot read becomes what it can (a
# target row with such a NULL, e.g. from an old import, cannot sign in at all). Values are never changed.
_REPAIR_EXPRESSIONS: dict[str, str] = {
    "instance_id": "coalesce(t.instance_id, '00000000-0000-0000-0000-000000000000'::uuid)",
    "aud": f"coalesce(t.aud, nullif(s.aud, ''), '{DEFAULT_AUD}')",
    "role": f"coalesce(t.role, nullif(s.role, ''), '{DEFAULT_ROLE}')",
    **{name: f"coalesce(t.{name}, '')" for name in _TOKEN_COLUMNS},
    "email_change_confirm_status": "coalesce(t.email_change_confirm_status, 0)",
    "created_at": "coalesce(t.created_at, s.created_at, now())",
    "updated_at": "coalesce(t.updated_at, s.updated_at, t.created_at, now())",
}
# source-wins on a matched user: what production says, but never clearing what the target knows.
_UPDATE_EXPRESSIONS: dict[str, str] = {
    **_REPAIR_EXPRESSIONS,
    # The matching left these NULL when another user holds the address.
    "email": "coalesce(s.email_out, t.email)",
    "phone": "coalesce(s.phone_out, t.phone)",
    "encrypted_password": "coalesce(nullif(s.encrypted_password, ''), t.encrypted_password)",
    "email_confirmed_at": "coalesce(s.email_confirmed_at, t.email_confirmed_at)",
    "phone_confirmed_at": "coalesce(s.phone_confirmed_at, t.phone_confirmed_at)",
    "last_sign_in_at": "greatest(s.last_sign_in_at, t.last_sign_in_at)",
    "raw_app_meta_data": "coalesce(" + _OBJECT.format("raw_app_meta_data") + ", t.raw_app_meta_data)",
    "raw_user_meta_data": "coalesce(" + _OBJECT.format("raw_user_meta_data") + ", t.raw_user_meta_data)",
    "banned_until": "s.banned_until",
    "deleted_at": "s.deleted_at",
    "is_anonymous": "coalesce(s.is_anonymous, t.is_anonymous)",
    "updated_at": "coalesce(greatest(t.updated_at, s.updated_at), t.created_at, now())",
}
# Fixing up a user the admin API just created: every column as a direct insert would have written it,
# except the keys and what the API already normalised.
_RESTORE_SKIPPED = frozenset({"id", "instance_id", "email", "phone"})

# The source identities of the batch, as they will be written: user id, provider_id and sub follow a
# remapped user; identity_data's e-mail is lower-cased, as the Auth server stores it.
_INCOMING_IDENTITIES = """(
    SELECT i.id AS source_identity_id, u.source_id, u.target_id, u.action, i.provider,
           CASE WHEN i.provider IN ('email', 'phone') AND i.provider_id = u.source_id::text
                THEN u.target_id::text ELSE i.provider_id END AS provider_id,
           CASE WHEN i.provider IN ('email', 'phone') AND u.target_id <> u.source_id
                     AND d.data ->> 'sub' = u.source_id::text
                THEN jsonb_set(d.data, ARRAY['sub'], to_jsonb(u.target_id::text)) ELSE d.data END AS data,
           i.last_sign_in_at,
           coalesce(i.created_at, u.created_at, now()) AS created_at,
           coalesce(i.updated_at, i.created_at, u.created_at, now()) AS updated_at
    FROM _sync_stage_identities AS i
    JOIN _sync_stage_users AS u ON u.source_id = i.user_id
    CROSS JOIN LATERAL (
        SELECT CASE WHEN jsonb_typeof(i.identity_data -> 'email') = 'string'
                    THEN jsonb_set(i.identity_data, ARRAY['email'],
                                   to_jsonb(lower(i.identity_data ->> 'email')))
                    WHEN jsonb_typeof(i.identity_data) = 'object' THEN i.identity_data
                    ELSE jsonb_build_object('sub', i.provider_id) END AS data
    ) AS d
) AS n"""

_INSERT_IDENTITIES = f"""
INSERT INTO auth.identities (id, provider_id, user_id, identity_data, provider, last_sign_in_at,
                             created_at, updated_at)
SELECT CASE WHEN n.source_identity_id IS NULL
                 OR EXISTS (SELECT FROM auth.identities AS x WHERE x.id = n.source_identity_id)
            THEN gen_random_uuid() ELSE n.source_identity_id END,
       n.provider_id, n.target_id, n.data, n.provider, n.last_sign_in_at, n.created_at, n.updated_at
FROM {_INCOMING_IDENTITIES}
WHERE NOT EXISTS (SELECT FROM auth.identities AS x
                  WHERE x.provider_id = n.provider_id AND x.provider = n.provider)
"""

# The admin API wrote e-mail/phone identities with its own timestamps and minimal data: take the source's.
_RESTORE_IDENTITIES = f"""
UPDATE auth.identities AS x
SET identity_data = n.data, last_sign_in_at = n.last_sign_in_at, created_at = n.created_at,
    updated_at = n.updated_at
FROM {_INCOMING_IDENTITIES}
WHERE n.action = 'restore' AND x.provider = n.provider AND x.provider_id = n.provider_id
  AND x.user_id = n.target_id
  AND ROW(x.identity_data, x.last_sign_in_at, x.created_at, x.updated_at)
      IS DISTINCT FROM ROW(n.data, n.last_sign_in_at, n.created_at, n.updated_at)
"""

# Password login does not need it, but unlinking, admin e-mail changes and OAuth linking do.
_ADD_EMAIL_IDENTITIES = """
INSERT INTO auth.identities (provider_id, user_id, identity_data, provider, created_at, updated_at)
SELECT t.id::text, t.id,
       jsonb_build_object('sub', t.id::text, 'email', lower(t.email),
                          'email_verified', t.email_confirmed_at IS NOT NULL, 'phone_verified', false),
       'email', coalesce(t.created_at, now()), coalesce(t.updated_at, t.created_at, now())
FROM _sync_stage_users AS s
JOIN auth.users AS t ON t.id = s.target_id
WHERE t.email IS NOT NULL AND NOT t.is_sso_user AND t.deleted_at IS NULL
  AND NOT EXISTS (SELECT FROM auth.identities AS x WHERE x.provider = 'email' AND x.provider_id = t.id::text)
"""

_MAP_IDS = """
INSERT INTO _sync.id_map (table_name, source_key, target_key, reason, run_id)
SELECT 'auth.users', s.source_id::text, s.target_id::text, s.kind, $1
FROM _sync_stage_users AS s
WHERE s.kind IN ('email', 'phone')
ON CONFLICT (table_name, source_key) DO UPDATE
SET target_key = EXCLUDED.target_key, reason = EXCLUDED.reason, run_id = EXCLUDED.run_id
WHERE _sync.id_map.target_key IS DISTINCT FROM EXCLUDED.target_key
"""

# A user now found by id no longer needs (and must not keep) an older mapping.
_UNMAP_IDS = """
DELETE FROM _sync.id_map AS m
USING _sync_stage_users AS s
WHERE m.table_name = 'auth.users' AND m.source_key = s.source_id::text AND s.kind IN ('id', 'new')
"""

_RESOLVE_QUARANTINE = """
UPDATE _sync.quarantine AS q SET resolved_at = now()
FROM _sync_stage_users AS s
WHERE q.table_name = 'auth.users' AND q.resolved_at IS NULL AND q.source_key = s.source_id::text
"""

_MISSING_USERS = """
SELECT s.source_id FROM _sync_stage_users AS s
WHERE NOT EXISTS (SELECT FROM auth.users AS t WHERE t.id = s.target_id)
"""

_KEPT_CONTACTS = """
SELECT s.source_id, s.target_id,
       s.email_out IS NOT NULL AND lower(t.email) IS DISTINCT FROM s.email_out AS email_kept,
       s.phone_out IS NOT NULL AND t.phone IS DISTINCT FROM s.phone_out AS phone_kept,
       s.email_out, s.phone_out
FROM _sync_stage_users AS s
JOIN auth.users AS t ON t.id = s.target_id
WHERE s.action = 'update'
  AND ((s.email_out IS NOT NULL AND lower(t.email) IS DISTINCT FROM s.email_out)
       OR (s.phone_out IS NOT NULL AND t.phone IS DISTINCT FROM s.phone_out))
"""

_QUARANTINE = """
INSERT INTO _sync.quarantine (run_id, table_name, source_key, row_data, error, sqlstate)
VALUES ($1, 'auth.users', $2, $3::jsonb, $4, $5)
ON CONFLICT (table_name, source_key) WHERE resolved_at IS NULL DO UPDATE
SET run_id = EXCLUDED.run_id, row_data = EXCLUDED.row_data, error = EXCLUDED.error,
    sqlstate = EXCLUDED.sqlstate, created_at = now()
"""


def _create_stage_sql(name: str, fields: Sequence[tuple[str, str]]) -> str:
    return (
        sql.SQL("CREATE TEMP TABLE {} ({}) ON COMMIT DROP")
        .format(
            sql.Identifier(name),
            sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(n), sql.SQL(t)) for n, t in fields),
        )
        .as_string()
    )


def _set_sql(action: str, expressions: Mapping[str, str], columns: set[str]) -> str:
    """``UPDATE auth.users … FROM`` the stage for ``action`` rows, touching only rows where one of
    ``expressions`` (those of the target's ``columns``) changes a value; returns their source ids."""
    names = [c for c in expressions if c in columns]
    values = sql.SQL(", ").join(sql.SQL(expressions[c]) for c in names)
    return (
        sql.SQL(
            "UPDATE auth.users AS t SET ({}) = ROW({}) FROM _sync_stage_users AS s "
            "WHERE t.id = s.target_id AND s.action = {} AND ROW({}) IS DISTINCT FROM ROW({}) "
            "RETURNING s.source_id"
        )
        .format(
            sql.SQL(", ").join(map(sql.Identifier, names)),
            values,
            sql.Literal(action),
            sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(c)) for c in names),
            values,
        )
        .as_string()
    )


class TargetWriter:
    """Writes staged batches into the target's auth tables: one transaction per batch, bisecting refusals.

    Only the ``auth.users`` columns this target's Auth version has are written, generated ones never.
    After a lost connection the writer reconnects (``conn`` may change).
    """

    def __init__(
        self,
        endpoint: Endpoint,
        conn: asyncpg.Connection,
        options: AuthOptions,
        run_id: int | None,
        report: AuthReport,
    ) -> None:
        self.endpoint = endpoint
        self.conn = conn
        self.options = options
        self.run_id = run_id
        self.report = report
        self._insert_users = self._update_users = self._repair_users = self._restore_users = ""
        self._stage_users = _create_stage_sql(_STAGE_USERS, (*_ROUTING_FIELDS, *_STAGED_FIELDS))
        self._stage_identities = _create_stage_sql(_STAGE_IDENTITIES, _IDENTITY_FIELDS)
        # A fresh temporary table has no statistics; the joins below plan better with them.
        self._analyze_stage = sql.SQL("ANALYZE {}").format(sql.Identifier(_STAGE_USERS)).as_string()

    async def prepare(self) -> None:
        """Build the statements for the target's own ``auth.users`` columns."""
        columns = await _columns(self.conn, USERS_TABLE, writable=True)
        if "provider_id" not in await _columns(self.conn, "auth.identities"):
            raise UsageError(
                "The target's auth.identities has the shape of Auth servers before November 2023 (no "
                "provider_id): upgrade the target project's Auth first."
            )
        insert_columns = [c for c in _INSERT_EXPRESSIONS if c in columns]
        self._insert_users = (
            sql.SQL(
                "INSERT INTO auth.users ({}) SELECT {} FROM _sync_stage_users AS s WHERE s.action = 'create'"
            )
            .format(
                sql.SQL(", ").join(map(sql.Identifier, insert_columns)),
                sql.SQL(", ").join(sql.SQL(_INSERT_EXPRESSIONS[c]) for c in insert_columns),
            )
            .as_string()
        )
        self._update_users = _set_sql("update", _UPDATE_EXPRESSIONS, columns)
        self._repair_users = _set_sql("keep", _REPAIR_EXPRESSIONS, columns)
        restored = {c: e for c, e in _INSERT_EXPRESSIONS.items() if c not in _RESTORE_SKIPPED}
        self._restore_users = _set_sql("restore", restored, columns)

    async def land(self, batch: Sequence[StagedUser]) -> None:
        """Write ``batch``; a refused batch is split until the refused users are isolated and quarantined."""
        if not batch:
            return
        try:
            result = await self._write_retrying(batch)
        except (asyncpg.PostgresError, _MissingReference) as exc:
            if is_transient_db_error(exc):
                raise
            if str(getattr(exc, "sqlstate", "")).startswith("42"):
                # A missing object, privilege or syntax: no user causes it, every user would be refused.
                raise SyncError(f"The target refused the auth import: {_message(exc)}") from exc
            if len(batch) == 1:
                await self.quarantine(batch[0].row, _message(exc), getattr(exc, "sqlstate", None))
                return
            half = len(batch) // 2
            await self.land(batch[:half])
            await self.land(batch[half:])
            return
        self._count(batch, result)

    def _count(self, batch: Sequence[StagedUser], result: BatchResult) -> None:
        report = self.report
        report.created += result.created
        report.identities_created += result.identities + result.email_identities
        report.email_identities_added += result.email_identities
        for user in batch:
            kind = user.match.kind
            if kind is MatchKind.NEW:
                continue
            if kind is MatchKind.ID:
                report.matched_by_id += 1
            elif kind is MatchKind.EMAIL:
                report.matched_by_email += 1
            else:
                report.matched_by_phone += 1
            if kind in (MatchKind.EMAIL, MatchKind.PHONE):
                report.mapped.append(user.match)
            if user.row["id"] in result.updated:
                report.updated += 1
            else:
                report.unchanged += 1

    async def _write_retrying(self, batch: Sequence[StagedUser]) -> BatchResult:
        async def attempt() -> BatchResult:
            if self.conn.is_closed():
                self.conn = await connect(self.endpoint)
            return await self._write(batch)

        return await retrying(
            is_transient_db_error,
            attempts=self.options.retry_attempts,
            initial_wait=self.options.retry_initial_wait,
            max_wait=self.options.retry_max_wait,
            what=f"writing a batch of {len(batch)} auth user(s)",
        )(attempt)

    async def _write(self, batch: Sequence[StagedUser]) -> BatchResult:
        conn = self.conn
        result = BatchResult()
        async with conn.transaction():
            if self.options.triggers is TriggerMode.SKIP:
                # A literal SET LOCAL: hosted Supabase allows it to postgres only in this form.
                await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute(self._stage_users)
            await conn.execute(self._stage_identities)
            await conn.copy_records_to_table(
                _STAGE_USERS,
                records=[u.record() for u in batch],
                columns=[n for n, _ in (*_ROUTING_FIELDS, *_STAGED_FIELDS)],
            )
            await conn.copy_records_to_table(
                _STAGE_IDENTITIES,
                records=[tuple(i[n] for n, _ in _IDENTITY_FIELDS) for u in batch for i in u.identities],
                columns=[n for n, _ in _IDENTITY_FIELDS],
            )
            await conn.execute(self._analyze_stage)
            result.created = _rowcount(await conn.execute(self._insert_users))
            for statement in (self._update_users, self._repair_users):
                result.updated.update(r["source_id"] for r in await conn.fetch(statement))
            await conn.execute(self._restore_users)
            result.identities = _rowcount(await conn.execute(_INSERT_IDENTITIES))
            await conn.execute(_RESTORE_IDENTITIES)
            result.email_identities = _rowcount(await conn.execute(_ADD_EMAIL_IDENTITIES))
            await conn.execute(_MAP_IDS, self.run_id)
            await conn.execute(_UNMAP_IDS)
            await conn.execute(_RESOLVE_QUARANTINE)
            if self.options.triggers is TriggerMode.SKIP:
                missing = await conn.fetch(_MISSING_USERS)
                if missing:
                    raise _MissingReference(
                        f"target user of production user {missing[0]['source_id']} is missing "
                        "(foreign keys are not checked while triggers are skipped)"
                    )
        return result

    async def quarantine(self, row: Mapping[str, Any], error: str, sqlstate: str | None = None) -> None:
        """Record a source user that did not land (in its own transaction) and report it."""
        user_id = row["id"]
        self.report.quarantined += 1
        self.report.quarantine.append(QuarantinedUser(user_id, row.get("email"), error, sqlstate))
        async with self.conn.transaction():
            await self.conn.execute(_QUARANTINE, self.run_id, str(user_id), _row_json(row), error, sqlstate)


def _rowcount(status: str) -> int:
    """The row count of a command tag such as ``INSERT 0 12`` or ``UPDATE 3``."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _message(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    detail = getattr(exc, "detail", None)
    return f"{text} ({detail})" if detail else text


def _row_json(row: Mapping[str, Any]) -> str:
    """The source row for the quarantine, without the password hash (the target holds enough of those)."""
    data: dict[str, Any] = {}
    for key, value in dict(row).items():
        if key == "encrypted_password":
            continue
        if key in ("raw_app_meta_data", "raw_user_meta_data") and isinstance(value, str):
            value = json.loads(value)
        data[key] = value
    return json.dumps(data, default=str)


# ---------------------------------------------------------------------------------- per-user notes


def hash_problem(value: str | None) -> str | None:
    """Why the Auth server cannot check this password hash, or None when it can (or there is none)."""
    if not value:
        return None
    if _BCRYPT.fullmatch(value) or _ARGON2.fullmatch(value) or _FBSCRYPT.fullmatch(value):
        return None
    if value.lstrip().startswith("{"):
        return (
            "password hash encrypted by the source's Auth server: it decrypts on the target only with the "
            "same key id configured there"
        )
    return "password hash in a format the Auth server cannot check: password sign-in will fail"


def _direct_notes(row: Mapping[str, Any], match: UserMatch) -> list[UserNote]:
    notes = []
    if match.reason:
        notes.append(UserNote(row["id"], match.target_id, match.reason))
    if match.kind is MatchKind.NEW and row["is_sso_user"]:
        notes.append(
            UserNote(
                row["id"],
                match.target_id,
                "SSO user: signs in only if the target has the same SSO provider (sso_providers are not "
                "copied)",
            )
        )
    problem = hash_problem(row["encrypted_password"])
    if problem and match.kind is not MatchKind.QUARANTINED:
        notes.append(UserNote(row["id"], match.target_id, problem))
    return notes


# ----------------------------------------------------------------------------------------- admin API


class ApiOutcome(StrEnum):
    CREATED = "created"
    MAPPED = "mapped"
    DIRECT = "direct"
    QUARANTINED = "quarantined"


@dataclass(frozen=True, slots=True)
class ApiResult:
    """What creating one user through the admin API came to: created, mapped to the holder of its
    e-mail/phone, to be written directly instead, or quarantined (with the reason)."""

    outcome: ApiOutcome
    target_id: UUID | None = None
    kind: MatchKind = MatchKind.NEW
    reason: str | None = None


HolderLookup = Callable[[str, str], Awaitable[UUID | None]]
"""``(kind, value)`` → the id of the target user whose e-mail (``kind`` "email") or phone it is."""


def is_transient_api_error(exc: BaseException) -> bool:
    """True for admin-API failures worth retrying: 429, 5xx, timeouts and dropped connections."""
    if isinstance(exc, AuthRetryableError):
        return True
    if isinstance(exc, AuthApiError):
        return exc.status == 429 or exc.status >= 500
    if isinstance(exc, AuthUnknownError):  # a non-JSON answer, e.g. a gateway's text 429
        status = _http_status(exc)
        return status is not None and (status == 429 or status >= 500)
    return False


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status behind a client error: the client keeps it only on the httpx cause."""
    response = getattr(exc.__cause__, "response", None)
    return response.status_code if response is not None else None


def retry_after(exc: BaseException) -> float | None:
    """Seconds the server asked to wait (``Retry-After``: seconds or an HTTP date), else None."""
    response = getattr(exc.__cause__, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)


def api_refusal(row: Mapping[str, Any], match: UserMatch) -> str | None:
    """Why the admin API cannot create this user at all, or None."""
    if row["is_sso_user"]:
        return "SSO user: the admin API cannot create SSO users"
    email = normal_email(row["email"]) if match.keep_email else None
    phone = normal_phone(row["phone"]) if match.keep_phone else None
    if not email and not phone:
        what = "anonymous user" if row["is_anonymous"] else "user"
        return f"{what} without e-mail or phone: the admin API cannot create it"
    if hash_problem(row["encrypted_password"]):
        return "password hash in a format the admin API refuses"
    return None


def create_attributes(row: Mapping[str, Any], match: UserMatch) -> dict[str, Any]:
    """The ``create_user`` body for a source user: id, contacts, hash, confirmations, metadata, ban."""
    attributes: dict[str, Any] = {
        "id": str(row["id"]),
        # Always sent: without it the server answers "user_metadata": null, which the client cannot parse.
        "user_metadata": _json_object(row["raw_user_meta_data"]),
        "app_metadata": _json_object(row["raw_app_meta_data"]),
        "email_confirm": row["email_confirmed_at"] is not None,
        "phone_confirm": row["phone_confirmed_at"] is not None,
    }
    if match.keep_email and (email := normal_email(row["email"])):
        attributes["email"] = email
    if match.keep_phone and (phone := normal_phone(row["phone"])):
        attributes["phone"] = phone
    if row["encrypted_password"]:
        attributes["password_hash"] = row["encrypted_password"]
    if row["role"] and row["role"] != DEFAULT_ROLE:
        attributes["role"] = row["role"]
    if row["aud"] and row["aud"] != DEFAULT_AUD:
        attributes["aud"] = row["aud"]
    if (remaining := _ban_remaining(row)) >= 1:
        attributes["ban_duration"] = f"{int(remaining)}s"
    return attributes


def _ban_remaining(row: Mapping[str, Any]) -> float:
    """Seconds of ban left (0 for none or an expired one)."""
    banned = row["banned_until"]
    return max((banned - datetime.now(UTC)).total_seconds(), 0.0) if banned else 0.0


def _json_object(value: str | dict[str, Any] | None) -> dict[str, Any]:
    parsed = json.loads(value) if isinstance(value, str) else value
    return parsed if isinstance(parsed, dict) else {}


def uncarried(row: Mapping[str, Any], identities: Sequence[Mapping[str, Any]]) -> str:
    """What the admin API left out for this user, in words."""
    parts = ["original creation and sign-in times (set by the server)"]
    if row["email_confirmed_at"] or row["phone_confirmed_at"]:
        parts.append("confirmation times (set to the time of import)")
    oauth = sorted({i["provider"] for i in identities if i["provider"] not in ("email", "phone")})
    if oauth:
        parts.append(f"{', '.join(oauth)} identit{'y' if len(oauth) == 1 else 'ies'}")
    if _ban_remaining(row):
        parts.append("the exact banned_until (a ban duration from now instead)")
    if row["deleted_at"]:
        parts.append("deleted_at")
    return "the admin API could not carry: " + "; ".join(parts) + " (give the target DSN to write them)"


class AdminApiCreator:
    """Creates users through the Auth admin API, idempotently, with bounded concurrency and retries.

    ``claimed`` is the matching's target id → source id map, kept current as users get mapped;
    ``find_holder`` says who holds an e-mail/phone (by default the admin API's list filter, which
    finds e-mails only).
    """

    def __init__(
        self,
        api: AdminApi,
        options: AuthOptions,
        claimed: dict[UUID, UUID],
        find_holder: HolderLookup | None = None,
    ) -> None:
        self.api = api
        self.options = options
        self.claimed = claimed
        self.find_holder = find_holder or self._list_holder
        self._http: httpx.AsyncClient | None = None
        self._client: Any = None
        self._slots = asyncio.Semaphore(options.concurrency)

    async def __aenter__(self) -> AdminApiCreator:
        self._http = httpx.AsyncClient(timeout=self.api.timeout, follow_redirects=True)
        self._client = await acreate_client(
            self.api.url,
            self.api.service_role_key.get_secret_value(),
            options=AsyncClientOptions(
                auto_refresh_token=False, persist_session=False, httpx_client=self._http
            ),
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._http is not None:
            await self._http.aclose()

    @property
    def admin(self) -> Any:
        """The client's ``auth.admin`` (``AsyncGoTrueAdminAPI``)."""
        return self._client.auth.admin

    async def list_target(self) -> list[TargetKey]:
        """Every target user's keys, page by page (when no target DSN is at hand)."""
        keys: list[TargetKey] = []
        page, per_page = 1, 1000
        while True:
            users = await self._call(self.admin.list_users, "listing the target's users", page, per_page)
            for user in users:
                email = normal_email(user.email)
                keys.append(
                    TargetKey(
                        UUID(str(user.id)),
                        email,
                        normal_phone(user.phone),
                        exact_email=user.email == email,
                        created_at=user.created_at,
                    )
                )
            if len(users) < per_page:
                return keys
            page += 1

    async def create_all(self, users: Sequence[tuple[Mapping[str, Any], UserMatch]]) -> list[ApiResult]:
        """Create each (row, match), at most ``concurrency`` at once; results in the same order."""
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._bounded(row, match)) for row, match in users]
        except* Exception as failures:  # the first failure is the one worth a message
            raise failures.exceptions[0] from None
        return [task.result() for task in tasks]

    async def _bounded(self, row: Mapping[str, Any], match: UserMatch) -> ApiResult:
        async with self._slots:
            return await self.create(row, match)

    async def create(self, row: Mapping[str, Any], match: UserMatch) -> ApiResult:
        """Create one user. Before every retry the user is looked up by id: a 504 or a timeout may hide
        a create that landed, and creating it again would answer 500 (taken id) or 422 (taken e-mail)."""
        attributes = create_attributes(row, match)
        tries = 0

        async def attempt() -> ApiResult:
            nonlocal tries
            tries += 1
            if tries > 1 and (found := await self._get(row["id"])) is not None:
                return self._landed(attributes, found)
            try:
                await self.admin.create_user(attributes)
            except ValidationError:
                # A 200 the client could not parse: the user exists; make sure it is this one.
                found = await self._get(row["id"])
                if found is None:
                    raise
                return self._landed(attributes, found)
            except AuthApiError as exc:
                if exc.status in (401, 403):
                    raise UsageError(
                        f"The Auth server refused the service-role key ({exc.status} {exc.code}): "
                        "check --service-role-key / SUPABASE_SERVICE_ROLE_KEY."
                    ) from None
                if exc.status == 422 and exc.code in ("email_exists", "phone_exists"):
                    return await self._held(row, match, "email" if exc.code == "email_exists" else "phone")
                raise
            return ApiResult(ApiOutcome.CREATED, row["id"])

        try:
            return await self._retrying(f"creating user {row['id']}")(attempt)
        except (AuthError, ValidationError, httpx.HTTPError) as exc:
            if not is_transient_api_error(exc):
                return ApiResult(ApiOutcome.QUARANTINED, reason=f"admin API: {_api_message(exc)}")
            if (found := await self._get_quietly(row["id"])) is not None:
                return self._landed(attributes, found)
            # A 500 that outlived the retries hides its cause (often a trigger that raises); a direct
            # write, when possible, lands the user or quarantines it with the database's own message.
            return ApiResult(
                ApiOutcome.DIRECT, row["id"], reason=f"admin API kept failing: {_api_message(exc)}"
            )

    @staticmethod
    def _landed(attributes: Mapping[str, Any], found: Any) -> ApiResult:
        """A user with this id exists: it is the one an earlier attempt created if it has what was sent."""
        if (normal_email(found.email), normal_phone(found.phone)) == (
            attributes.get("email"),
            attributes.get("phone"),
        ):
            return ApiResult(ApiOutcome.CREATED, UUID(attributes["id"]))
        return ApiResult(
            ApiOutcome.QUARANTINED,
            reason=f"its id is already used on the target by another user ({found.email or found.phone})",
        )

    async def _held(self, row: Mapping[str, Any], match: UserMatch, kind: str) -> ApiResult:
        value = normal_email(row["email"]) if kind == "email" else normal_phone(row["phone"])
        holder = await self.find_holder(kind, value or "")
        if holder == row["id"]:
            return ApiResult(ApiOutcome.CREATED, holder)  # an earlier attempt landed after all
        if holder is None:
            return ApiResult(
                ApiOutcome.QUARANTINED,
                reason=f"the Auth server says {kind} {value} is taken, but no user has it as its {kind}: "
                "another user's identity (e.g. a Google account) carries it; unlink it, then rerun",
            )
        if row["deleted_at"] is not None:
            return ApiResult(
                ApiOutcome.QUARANTINED,
                reason=f"deleted in production, and its {kind} {value} now belongs to target user {holder}",
            )
        other = self.claimed.get(holder)
        if other is not None:
            return ApiResult(
                ApiOutcome.QUARANTINED,
                reason=f"its {kind} {value} belongs to target user {holder}, already matched to production "
                f"user {other}: merge or change one of them, then rerun",
            )
        self.claimed[holder] = row["id"]
        return ApiResult(ApiOutcome.MAPPED, holder, MatchKind(kind))

    async def _list_holder(self, kind: str, value: str) -> UUID | None:
        if kind != "email":
            return None  # the list filter searches e-mails and names only
        assert self._http is not None
        key = self.api.service_role_key.get_secret_value()

        async def search() -> httpx.Response:
            response = await self._http.get(  # type: ignore[union-attr]
                f"{self.api.url.rstrip('/')}/auth/v1/admin/users",
                params={"filter": value, "per_page": "1000"},
                headers={
                    "apikey": key,
                    "Authorization": f"Bearer {key}",
                    "X-Supabase-Api-Version": "2024-01-01",
                },
            )
            response.raise_for_status()
            return response

        response = await self._retrying(f"looking up who holds {value}", http=True)(search)
        for user in response.json().get("users", []):
            # The filter is a LIKE: '_' and '%' in addresses are wildcards, so compare exactly here.
            if normal_email(user.get("email")) == value:
                return UUID(user["id"])
        return None

    async def _get(self, user_id: UUID) -> Any:
        """The target user with this id, or None (404)."""
        try:
            return (await self.admin.get_user_by_id(str(user_id))).user
        except AuthApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def _get_quietly(self, user_id: UUID) -> Any:
        try:
            return await self._call(self._get, f"looking up user {user_id}", user_id)
        except (AuthError, ValidationError, httpx.HTTPError):
            return None  # the create already failed; this lookup only rescues a hidden success

    async def _call(self, call: Callable[..., Awaitable[Any]], what: str, *args: Any) -> Any:
        return await self._retrying(what)(call, *args)

    def _retrying(self, what: str, *, http: bool = False) -> Any:
        o = self.options
        return retrying(
            _is_transient_http_error if http else is_transient_api_error,
            attempts=o.retry_attempts,
            initial_wait=o.retry_initial_wait,
            max_wait=o.retry_max_wait,
            wait_hint=_http_retry_after if http else retry_after,
            what=what,
        )


def _is_transient_http_error(exc: BaseException) -> bool:
    if isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
        return status == 429 or status >= 500
    return isinstance(exc, httpx.TransportError)


def _http_retry_after(exc: BaseException) -> float | None:
    if isinstance(exc, httpx.HTTPStatusError):
        carrier = Exception()
        carrier.__cause__ = exc
        return retry_after(carrier)
    return None


def _api_message(exc: BaseException) -> str:
    status = getattr(exc, "status", None) or _http_status(exc)
    code = getattr(exc, "code", None)
    text = getattr(exc, "message", None) or str(exc).strip() or type(exc).__name__
    return " ".join(str(part) for part in (status, code, text) if part)


# -------------------------------------------------------------------------------------- orchestration


async def import_users(
    source: Endpoint,
    target: Endpoint | None,
    options: AuthOptions | None = None,
    *,
    admin_api: AdminApi | None = None,
    run_id: int | None = None,
    changed_since: datetime | None = None,
) -> AuthReport:
    """Bring every source auth user onto the target (rules in the module docstring); return the report.

    ``changed_since`` limits a catch-up to the users created, changed or signed in since then (every
    other user was brought over by an earlier run).

    ``direct`` needs ``target``. ``admin-api`` needs ``admin_api`` and, when ``target`` is given too,
    writes there what the API cannot carry, the id map and the quarantine. Raises UsageError before
    writing anything when an option or a privilege is missing.
    """
    options = options or AuthOptions()
    _check_options(options, target, admin_api)
    started = time.monotonic()
    report = AuthReport(mode=options.mode, policy=options.policy, triggers=options.triggers)
    source_conn = await connect(source)
    writer: TargetWriter | None = None
    try:
        await check_privileges(source_conn, "source", _SOURCE_PRIVILEGES)
        if target is not None:
            target_conn = await connect(target)
            writer = TargetWriter(target, target_conn, options, run_id, report)
            hint = ", or use --auth-mode admin-api" if options.mode is AuthMode.DIRECT else ""
            await check_privileges(target_conn, "target", _TARGET_PRIVILEGES, hint)
            if options.triggers is TriggerMode.SKIP:
                await check_trigger_skip(target_conn)
            await ensure_state(target_conn)
            await writer.prepare()
        run = _Import(options, report, writer, changed_since)
        if admin_api is not None and options.mode is AuthMode.ADMIN_API:
            holder = _database_holder(writer) if writer is not None else None
            async with AdminApiCreator(admin_api, options, run.claimed, holder) as api:
                run.api = api
                await run.run(source_conn)
        else:
            await run.run(source_conn)
    finally:
        await source_conn.close()
        if writer is not None:
            await writer.conn.close()
    report.seconds = round(time.monotonic() - started, 3)
    return report


def _check_options(options: AuthOptions, target: Endpoint | None, admin_api: AdminApi | None) -> None:
    if options.include_mfa:
        raise UsageError("Copying MFA factors (include_mfa) is not available yet: leave it off.")
    if options.mode is AuthMode.DIRECT and target is None:
        raise UsageError("The direct auth mode needs the target database (--target).")
    if options.mode is AuthMode.ADMIN_API and admin_api is None:
        raise UsageError(
            "The admin-api auth mode needs the project URL and the service-role key "
            "(--supabase-url and --service-role-key, or SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY)."
        )


def _database_holder(writer: TargetWriter) -> HolderLookup:
    """Who holds an e-mail/phone, asked of the target database (one query at a time on its connection)."""
    lock = asyncio.Lock()

    async def holder(kind: str, value: str) -> UUID | None:
        async with lock:
            if kind == "email":
                return await writer.conn.fetchval(
                    "SELECT id FROM auth.users WHERE lower(email) = $1 AND NOT is_sso_user "
                    "ORDER BY email = $1 DESC, created_at LIMIT 1",
                    value,
                )
            return await writer.conn.fetchval("SELECT id FROM auth.users WHERE phone = $1", value)

    return holder


class _Import:
    """One auth import: match everyone first, then stream the source in batches to the writer or the API."""

    def __init__(
        self,
        options: AuthOptions,
        report: AuthReport,
        writer: TargetWriter | None,
        changed_since: datetime | None = None,
    ) -> None:
        self.changed_since = changed_since
        self.options = options
        self.report = report
        self.writer = writer
        self.api: AdminApiCreator | None = None
        self.matches: dict[UUID, UserMatch] = {}
        self.claimed: dict[UUID, UUID] = {}

    async def run(self, source_conn: asyncpg.Connection) -> None:
        async with read_only_snapshot(source_conn, self.changed_since) as snapshot:
            keys = await snapshot.keys()
            self.report.source_users = len(keys)
            await self._match(keys)
            async for rows in snapshot.batches(self.options.batch_size):
                identities: dict[UUID, list[asyncpg.Record]] = {row["id"]: [] for row in rows}
                for identity in await snapshot.identities(list(identities)):
                    identities[identity["user_id"]].append(identity)
                if self.api is not None:
                    await self._through_api(rows, identities)
                else:
                    await self._direct(rows, identities)
            self.report.not_copied = await snapshot.not_copied()

    async def _match(self, keys: list[SourceKey]) -> None:
        if self.writer is not None:
            target = await read_target_keys(self.writer.conn)
            id_map = await read_id_map(self.writer.conn)
        else:
            assert self.api is not None
            target, id_map = await self.api.list_target(), {}
        for match in match_users(keys, target, id_map):
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
            match = self.matches[row["id"]]
            if match.kind is MatchKind.QUARANTINED:
                await self._quarantine(row, match.reason or "quarantined")
                continue
            self.report.notes.extend(_direct_notes(row, match))
            staged.append(self._staged(row, identities, match))
        await self.writer.land(staged)

    async def _through_api(
        self, rows: Sequence[asyncpg.Record], identities: Mapping[UUID, list[asyncpg.Record]]
    ) -> None:
        assert self.api is not None
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
        self.report.notes.extend(_direct_notes(row, match))
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
