"""Auth users on both sides, as the rows :mod:`sync.compare` compares.

A production user must have exactly one target user (same id, or the one ``_sync.id_map`` names) with
the production password hash, the same confirmation state, the identities production has (e-mail,
phone, OAuth: no more, no fewer), and a shape the Auth server loads (reference/supabase-auth.md §2.2:
no NULL in the columns it scans as strings, the nil instance id, an audience, a lower-case e-mail).
The shape columns are constants on the source side, so a target user the server cannot load differs
from production in the column that names the problem.
"""

from __future__ import annotations

from sync.auth.columns import STRING_COLUMNS, USERS_TABLE
from sync.compare import Relation
from sync.sqltext import Params, ident

PASSWORD = "encrypted_password"

# One text per user: its identities' providers, with the provider's own id for OAuth ones (e-mail and
# phone identities carry the user's id, which a mapped user does not share with production).
_IDENTITIES = (
    "LEFT JOIN (SELECT user_id, string_agg(provider || CASE WHEN provider IN ('email', 'phone') "
    "THEN '' ELSE ':' || provider_id END, ' ' ORDER BY provider, provider_id) AS list "
    "FROM auth.identities GROUP BY user_id) AS i ON i.user_id = u.id"
)

LOADABLE = " AND ".join(
    f"u.{ident(c)} IS NOT NULL"
    for c in (*STRING_COLUMNS, "email_change_confirm_status", "created_at", "updated_at")
)
"""A user row ``u`` the Auth server can scan: no NULL where it reads a Go string, int or time."""

_SHAPE = {
    "string columns set": LOADABLE,
    "nil instance_id": "u.instance_id IS NOT DISTINCT FROM '00000000-0000-0000-0000-000000000000'::uuid",
    "lower-case e-mail": "u.email IS NOT DISTINCT FROM lower(u.email)",
}
"""What the Auth server needs to find and load a user (true on the target when it holds)."""


def _common(identities: str) -> list[tuple[str, str]]:
    """The columns compared, written alike on both sides: an empty hash and an unconfirmed contact are
    NULL on each, so equal users hash equal and only a real difference sends a bucket row by row."""
    return [
        ("email", "lower(trim(u.email))"),
        (PASSWORD, f"nullif(u.{ident(PASSWORD)}, '')"),
        ("email confirmed", "CASE WHEN u.email_confirmed_at IS NOT NULL THEN true END"),
        ("phone confirmed", "CASE WHEN u.phone_confirmed_at IS NOT NULL THEN true END"),
        ("identities", identities),
    ]


def _unless_unset(source: str | None, target: str | None) -> bool:
    """A NULL on the source side (no hash, not confirmed) never erases what the target holds."""
    return source is None or source == target


def _identities(source: str | None, target: str | None) -> bool:
    """Equal sets; a user who signed up again on the target (``~``) may also keep its own identities."""
    if target is not None and target.startswith("~"):
        return set((source or "").split()) <= set(target[1:].split())
    return source == target


MATCHERS = {
    PASSWORD: _unless_unset,
    "email confirmed": _unless_unset,
    "phone confirmed": _unless_unset,
    "identities": _identities,
}


def source_users() -> Relation:
    """Every production user. An empty production hash matches any target hash (it never erases one)."""
    shape = [(name, "true") for name in _SHAPE]
    return Relation(
        f"auth.users AS u {_IDENTITIES}",
        "u.id::text",
        [
            *_common("coalesce(i.list, '')"),
            *shape,
        ],
    )


def target_users(has_map: bool) -> Relation:
    """The target's users under production ids (a mapped user under the production id it stands for)."""
    shape = [(name, expr) for name, expr in _SHAPE.items()]
    if not has_map:
        return Relation(
            f"auth.users AS u {_IDENTITIES}",
            "u.id::text",
            [*_common("coalesce(i.list, '')"), *shape],
        )
    params = Params()
    return Relation(
        f"auth.users AS u {_IDENTITIES} {production_ids(params)}",
        PRODUCTION_ID,
        [
            *_common("CASE WHEN r.source_key IS NOT NULL THEN '~' ELSE '' END || coalesce(i.list, '')"),
            *shape,
        ],
        NOT_TAKEN,
        params,
    )


PRODUCTION_ID = "coalesce(r.source_key, u.id::text)"
"""A target user ``u``'s production id, over :func:`production_ids`' joins."""
NOT_TAKEN = "f.source_key IS NULL"
"""The target user ``u`` is not a production id the map sends to another user (a development twin)."""


def production_ids(params: Params) -> str:
    """Joins of a target user ``u`` to ``_sync.id_map``: ``r`` names the production id it stands for,
    ``f`` the user a production id that ``u`` holds was mapped to instead (see :data:`NOT_TAKEN`)."""
    owned = params.bind(USERS_TABLE, "text")
    entries = f"(SELECT source_key, target_key FROM _sync.id_map WHERE table_name = {owned})"
    return (
        f"LEFT JOIN {entries} AS r ON r.target_key = u.id::text "
        f"LEFT JOIN {entries} AS f ON f.source_key = u.id::text AND r.source_key IS NULL"
    )
