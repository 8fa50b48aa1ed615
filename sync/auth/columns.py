"""The auth tables' columns as the import reads and writes them, and the live column lists of a server."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from sync.sqltext import ident

USERS_TABLE = "auth.users"
"""``table_name`` of users in ``_sync.id_map`` and ``_sync.quarantine``."""
IDENTITIES_TABLE = "auth.identities"
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
TOKEN_COLUMNS = STRING_COLUMNS[2:]
SENT_AT_COLUMNS = (
    "confirmation_sent_at",
    "recovery_sent_at",
    "email_change_sent_at",
    "phone_change_sent_at",
    "reauthentication_sent_at",
)

Fields = tuple[tuple[str, str], ...]
"""``(column, type)`` pairs, in the order rows carry them."""

# What the stage keeps of a source user, with the type it is staged as (besides id, e-mail, phone).
STAGED_FIELDS: Fields = (
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
SOURCE_USER_FIELDS: Fields = (
    ("id", "uuid"),
    ("email", "text"),
    ("phone", "text"),
    *STAGED_FIELDS,
)
IDENTITY_FIELDS: Fields = (
    ("id", "uuid"),
    ("provider_id", "text"),
    ("user_id", "uuid"),
    ("identity_data", "jsonb"),
    ("provider", "text"),
    ("last_sign_in_at", "timestamptz"),
    ("created_at", "timestamptz"),
    ("updated_at", "timestamptz"),
)


def select_list(fields: Sequence[tuple[str, str]], present: set[str]) -> str:
    """``col::type AS col`` for each field, ``NULL::type`` for the ones this server's table lacks."""
    return ", ".join(
        f"{ident(name) if name in present else 'NULL'}::{kind} AS {ident(name)}" for name, kind in fields
    )


async def table_columns(conn: asyncpg.Connection, table: str, *, writable: bool = False) -> set[str]:
    """The column names of ``table``; with ``writable``, without generated columns."""
    rows = await conn.fetch(
        "SELECT attname FROM pg_attribute WHERE attrelid = $1::regclass AND attnum > 0 "
        "AND NOT attisdropped AND (NOT $2 OR attgenerated = '')",
        table,
        writable,
    )
    return {r["attname"] for r in rows}
