"""User matching: which target user each production user is; ``sync run`` and ``sync plan`` both use it.

The rules (same id, the id map, same e-mail, same phone, otherwise created; deleted and SSO users by id
only; one target user for at most one source user) are in the package docstring.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from uuid import UUID

import asyncpg

from sync.auth.columns import USERS_TABLE

DeletedAccounts = Collection[UUID] | asyncio.Future[frozenset[UUID]]
"""Target users whose production account was deleted, or the search that will know them (the import
reads production's users meanwhile, and waits for it before it reads the target's)."""


async def deleted_ones(accounts: DeletedAccounts) -> Collection[UUID]:
    """The deleted accounts, once the search knows them."""
    return await accounts if isinstance(accounts, asyncio.Future) else accounts


class MatchKind(StrEnum):
    """How a source user found its target user, or that it is created or set aside."""

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
    deleted_accounts: Collection[UUID] = (),
) -> list[UserMatch]:
    """Match each source user (given oldest first) to at most one target user, by the package's rules.

    ``id_map`` holds earlier runs' decisions (source id → target id, reason). ``deleted_accounts``
    are target users whose production account was deleted: a person who signs up again is a new
    user, so no one is matched to them by e-mail or phone. Returns one :class:`UserMatch` per source
    user, in the order given.
    """
    return _Matcher(list(target), id_map or {}, frozenset(deleted_accounts)).run(source)


class _Matcher:
    def __init__(
        self,
        target: list[TargetKey],
        id_map: Mapping[UUID, tuple[UUID, str]],
        deleted_accounts: frozenset[UUID] = frozenset(),
    ) -> None:
        self.deleted_accounts = deleted_accounts
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
            for what, value, index in (("e-mail", s.email, self.by_email), ("phone", s.phone, self.by_phone)):
                held = index.get(value) if value else None
                if held is not None and held.id in self.deleted_accounts:
                    return UserMatch(
                        s.id,
                        None,
                        MatchKind.QUARANTINED,
                        f"its {what} {value} belongs to target user {held.id}, whose production account "
                        "was deleted: this is a new account, not that one; `sync run --deletes apply` "
                        "removes the old account and brings this one",
                    )
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


# Stored exactly as :func:`normal_email` / :func:`normal_phone` would leave them: printable ASCII without
# spaces, upper-case letters (e-mail) or ``+`` (phone). Any other stored value is read whatever it is.
PLAIN_EMAIL = r"^[!-@\[-~]*$"
PLAIN_PHONE = r"^[!-*,-~]*$"
_TARGET_KEY = "SELECT id, email, phone, coalesce(is_sso_user, false) AS sso, created_at FROM auth.users"


async def read_target_keys(
    conn: asyncpg.Connection,
    source: Sequence[SourceKey] | None = None,
    id_map: Mapping[UUID, tuple[UUID, str]] | None = None,
) -> list[TargetKey]:
    """The matching keys of the target users the matcher can meet for ``source`` (every user when None).

    Those are the users with a source user's id or the id it is mapped to, and those whose e-mail or phone,
    normalised, is a source user's. Stored values already in normal form are found through the indexes on
    ``id``, ``email`` and ``phone``; the few stored otherwise (another case, spaces, a ``+``) are all read and
    normalised here. :func:`match_users` gives the same matches over these as over every target user.
    """
    if source is None:
        return _target_keys(await conn.fetch(_TARGET_KEY))
    if not source:
        return []
    # Lists of the keys' own values (a repeat costs the server nothing, a copy of each would cost memory).
    ids = [s.id for s in source]
    ids += [prior[0] for s in source if (prior := (id_map or {}).get(s.id)) is not None]
    emails = [s.email for s in source if s.email]
    phones = [s.phone for s in source if s.phone]
    rows = await conn.fetch(  # ids as text: the driver decodes no uuid[] without asking the server
        f"{_TARGET_KEY} WHERE id = ANY($1::text[]::uuid[]) "
        f"UNION {_TARGET_KEY} WHERE email = ANY($2::text[]) AND is_sso_user = false "
        f"UNION {_TARGET_KEY} WHERE phone = ANY($3::text[]) "
        f"UNION {_TARGET_KEY} WHERE email !~ '{PLAIN_EMAIL}' OR phone !~ '{PLAIN_PHONE}'",
        [str(i) for i in ids],
        emails,
        phones,
    )
    return _target_keys(rows)


def _target_keys(rows: Iterable[asyncpg.Record]) -> list[TargetKey]:
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


async def read_id_map(
    conn: asyncpg.Connection, source_ids: Collection[UUID] | None = None
) -> dict[UUID, tuple[UUID, str]]:
    """Earlier runs' user mappings (source id → target id, reason), of ``source_ids`` when given; none
    before the first run."""
    if not await conn.fetchval("SELECT to_regclass('_sync.id_map') IS NOT NULL"):
        return {}
    query = "SELECT source_key, target_key, reason FROM _sync.id_map WHERE table_name = $1"
    if source_ids is None:
        rows = await conn.fetch(query, USERS_TABLE)
    else:
        ids = [str(i) for i in source_ids]  # as text: no uuid[] for the driver to ask the server about
        rows = await conn.fetch(f"{query} AND source_key = ANY($2::text[])", USERS_TABLE, ids)
    return {UUID(r["source_key"]): (UUID(r["target_key"]), r["reason"]) for r in rows}
