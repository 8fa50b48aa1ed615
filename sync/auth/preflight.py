"""Before anything is written: the roles may read (and write) the auth tables, and skip triggers if asked."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from sync.auth.columns import IDENTITIES_TABLE, USERS_TABLE
from sync.errors import UsageError

TARGET_PRIVILEGES = (
    (USERS_TABLE, "SELECT"),
    (USERS_TABLE, "INSERT"),
    (USERS_TABLE, "UPDATE"),
    (IDENTITIES_TABLE, "SELECT"),
    (IDENTITIES_TABLE, "INSERT"),
    (IDENTITIES_TABLE, "UPDATE"),
)
SOURCE_PRIVILEGES = ((USERS_TABLE, "SELECT"), (IDENTITIES_TABLE, "SELECT"))


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
        "          FROM pg_class AS c WHERE c.oid = to_regclass(x.name)), false) AS rls, "
        "current_user AS role, "
        "(SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user) AS bypass "
        "FROM unnest($1::text[], $2::text[]) AS x(name, privilege)",
        [name for name, _ in needed],
        [privilege for _, privilege in needed],
    )
    role = {"name": rows[0]["role"], "bypass": rows[0]["bypass"]}
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
        if not conn.is_closed():  # a lost connection has nothing to roll back: its failure is told
            await transaction.rollback()
