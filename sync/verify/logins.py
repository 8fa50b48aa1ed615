"""Who can sign in with a password, by the Auth server's own checks, counted on production and the target.

The password grant (reference/supabase-auth.md §2.1–2.4) finds a user by e-mail (lower-cased) or phone,
the nil ``instance_id``, the request's audience (``authenticated`` on Supabase) and ``is_sso_user``
false, taking the first row; the user must load (no NULL where it scans a string, int or time, in the
user or its identities), hold a hash in a format it verifies (bcrypt, argon2i/id, fbscrypt), not be
banned now, and be confirmed on the way it signs in (``email_confirmed_at`` for e-mail,
``phone_confirmed_at`` for phone). ``deleted_at`` is not read at sign-in: a soft-deleted account has
neither e-mail nor hash, so those checks exclude it. A lookup two users answer is not counted: the
server returns one of them, unordered.

The same checks as ``sync verify --check-password`` (:mod:`sync.verify.signin`) for one user, made here
set-based for every user. A production user who can sign in there can sign in on the target when the
target user standing for it (same id, or mapped) passes the same checks with the same hash and at least
the same ways in.
"""

from __future__ import annotations

from datetime import datetime

import asyncpg

from sync.auth.columns import DEFAULT_AUD
from sync.compare import Relation, compare
from sync.models import Model
from sync.sqltext import Params
from sync.verify import users
from sync.verify.signin import NIL

WAYS_IN = "signs in with"
HASH = "password hash"

# Bcrypt of any $2x$ variant at cost 4-31, argon2i/argon2id, and GoTrue's fbscrypt notation (§2.3).
_USABLE_HASH = (
    r"u.encrypted_password ~ '^\$2[a-z]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}$' "
    r"OR u.encrypted_password ~ '^\$argon2(i|id)\$' OR u.encrypted_password ~ '^\$fbscrypt\$'"
)
_BY_EMAIL = "u.email <> '' AND u.email_confirmed_at IS NOT NULL AND u.email_twins = 1"
_BY_PHONE = "u.phone <> '' AND u.phone_confirmed_at IS NOT NULL AND u.phone_twins = 1"


class SignInCheck(Model):
    """Production users who can sign in with a password there, and how many of them can on the target."""

    production: int
    target: int
    cannot: list[str] = []
    """Production ids that sign in on production but not on the target with the same password."""

    @property
    def ok(self) -> bool:
        return not self.cannot

    def line(self) -> str:
        """One line for the verify report."""
        return (
            f"sign-in: {self.target:,} of {self.production:,} production users who can sign in with a "
            "password there can on the target (same e-mail or phone, same password)"
        )


def _users(params: Params) -> str:
    """Users the password grant can look up, each with the number of such users sharing its e-mail and
    phone, and whether its identities load."""
    aud = params.bind(DEFAULT_AUD, "text")
    return (
        "(SELECT u.*, count(*) OVER (PARTITION BY lower(u.email)) AS email_twins, "
        "count(*) OVER (PARTITION BY u.phone) AS phone_twins FROM auth.users AS u "
        f"WHERE u.instance_id = '{NIL}'::uuid AND u.aud = {aud} AND NOT coalesce(u.is_sso_user, false)) AS u "
        "LEFT JOIN (SELECT user_id, bool_and(created_at IS NOT NULL AND updated_at IS NOT NULL) AS loads "
        "FROM auth.identities GROUP BY user_id) AS li ON li.user_id = u.id"
    )


def _can_sign_in(params: Params, at: datetime) -> str:
    now = params.bind(at, "timestamptz")
    return (
        f"{users.LOADABLE} AND coalesce(li.loads, true) AND ({_USABLE_HASH}) "
        f"AND (u.banned_until IS NULL OR u.banned_until <= {now}) AND (({_BY_EMAIL}) OR ({_BY_PHONE}))"
    )


_COLUMNS = [
    (
        WAYS_IN,
        f"concat_ws(' ', CASE WHEN {_BY_EMAIL} THEN 'email:' || lower(u.email) END, "
        f"CASE WHEN {_BY_PHONE} THEN 'phone:' || u.phone END)",
    ),
    (HASH, "u.encrypted_password"),
]


def source_sign_ins(at: datetime) -> Relation:
    """Production users who can sign in with a password at ``at``."""
    params = Params()
    return Relation(_users(params), "u.id::text", _COLUMNS, _can_sign_in(params, at), params)


def target_sign_ins(has_map: bool, at: datetime) -> Relation:
    """Target users who can sign in with a password at ``at``, under the production id they stand for."""
    params = Params()
    from_sql = _users(params)
    where = _can_sign_in(params, at)
    if not has_map:
        return Relation(from_sql, "u.id::text", _COLUMNS, where, params)
    joins = users.production_ids(params)
    return Relation(
        f"{from_sql} {joins}", users.PRODUCTION_ID, _COLUMNS, f"{where} AND {users.NOT_TAKEN}", params
    )


def _at_least(source: str | None, target: str | None) -> bool:
    """The target lets the user in every way production does (more ways are fine)."""
    return set((source or "").split()) <= set((target or "").split())


async def check_sign_ins(
    sconn: asyncpg.Connection, tconn: asyncpg.Connection, has_map: bool, at: datetime, *, buckets: int
) -> SignInCheck:
    """Compare who can sign in on each side at ``at`` (bucketed hash aggregates, as every verify check)."""
    found = await compare(
        sconn,
        tconn,
        source_sign_ins(at),
        target_sign_ins(has_map, at),
        buckets=buckets,
        matchers={WAYS_IN: _at_least},
    )
    cannot = sorted([*found.missing, *found.different])
    return SignInCheck(production=found.in_scope, target=found.in_scope - len(cannot), cannot=cannot)
