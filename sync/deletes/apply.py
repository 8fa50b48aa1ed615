"""Applying production deletes on the target: the rows :mod:`sync.deletes.find` left in its table.

Set-based per table, children first (the caller's order). A row that some row not being deleted still
references (a development row in any table, whatever the foreign key's ``ON DELETE`` rule) is kept and
reported as held, so nothing development made is cascaded away or set to NULL. Users are deleted
(their identities and sessions go with them through the auth schema's own cascades), or marked deleted
as the Auth server's soft delete does.
"""

from __future__ import annotations

import asyncpg

from sync.deletes.find import GONE, SHOWN
from sync.sqltext import row_of, table_ident

# Every foreign key that points at a table: its child table and both column lists.
_CHILDREN = """
SELECT n.nspname AS schema, r.relname AS name,
       array(SELECT a.attname FROM unnest(c.conkey) WITH ORDINALITY AS k(num, i)
             JOIN pg_attribute AS a ON a.attrelid = c.conrelid AND a.attnum = k.num ORDER BY k.i) AS columns,
       array(SELECT a.attname FROM unnest(c.confkey) WITH ORDINALITY AS k(num, i)
             JOIN pg_attribute AS a ON a.attrelid = c.confrelid AND a.attnum = k.num ORDER BY k.i) AS parent
FROM pg_constraint AS c
JOIN pg_class AS r ON r.oid = c.conrelid
JOIN pg_namespace AS n ON n.oid = r.relnamespace
WHERE c.contype = 'f' AND c.confrelid = $1::regclass
"""


async def _still_referenced(tconn: asyncpg.Connection, name: str, skip_schema: str | None) -> str:
    """SQL (over target row ``t``) true when a row of any table still points at it."""
    tests = []
    for fk in await tconn.fetch(_CHILDREN, table_ident(name)):
        if fk["schema"] == skip_schema:
            continue
        child = table_ident(f"{fk['schema']}.{fk['name']}")
        points = f"{row_of(fk['columns'], 'c.')} = {row_of(fk['parent'], 't.')}"
        tests.append(f"EXISTS (SELECT FROM {child} AS c WHERE {points})")
    return " OR ".join(tests) or "false"


async def delete_gone(tconn: asyncpg.Connection, name: str, target_key: str, skip_schema: str | None) -> int:
    """Delete the gone rows nothing else references; repeated while it progresses (self-references)."""
    referenced = await _still_referenced(tconn, name, skip_schema)
    deleted = 0
    while True:
        status = await tconn.execute(
            f"DELETE FROM {table_ident(name)} AS t USING {GONE} AS g "
            f"WHERE {target_key} = g.k AND NOT ({referenced})"
        )
        count = int(status.split()[-1])
        deleted += count
        if count == 0:
            return deleted


def _obfuscated(user_id: str, value: str) -> str:
    """The Auth server's obfuscation: base64url (unpadded) of sha256(user id || value), in SQL."""
    return (
        f"rtrim(translate(encode(sha256(convert_to({user_id}::text || {value}, 'UTF8')), 'base64'), "
        f"'+/', '-_'), '=')"
    )


async def soft_delete_gone_users(tconn: asyncpg.Connection) -> int:
    """Mark the gone users deleted as the Auth server's soft delete does (unless still referenced)."""
    referenced = await _still_referenced(tconn, "auth.users", "auth")
    subject = _obfuscated("i.user_id", "i.provider || ':' || i.provider_id")
    email = _obfuscated("t.id", "coalesce(t.email, '')")
    phone = _obfuscated("t.id", "coalesce(t.phone, '')")
    await tconn.execute(
        f"UPDATE auth.identities AS i SET provider_id = {subject} "
        f"FROM {GONE} AS g, auth.users AS t WHERE t.id::text = g.k AND i.user_id = t.id "
        f"AND t.deleted_at IS NULL AND NOT ({referenced})"
    )
    status = await tconn.execute(
        f"UPDATE auth.users AS t SET deleted_at = now(), banned_until = now() + interval '876000 hours', "
        f"email = {email}, phone = left({phone}, 15), "
        f"email_change = '', phone_change = '', encrypted_password = '', confirmation_token = '', "
        f"recovery_token = '', email_change_token_current = '', email_change_token_new = '', "
        f"phone_change_token = '', reauthentication_token = '', updated_at = now() "
        f"FROM {GONE} AS g WHERE t.id::text = g.k AND t.deleted_at IS NULL AND NOT ({referenced})"
    )
    if await tconn.fetchval("SELECT to_regclass('auth.sessions') IS NOT NULL"):
        await tconn.execute(
            f"DELETE FROM auth.sessions AS s USING {GONE} AS g WHERE s.user_id::text = g.k "
            f"AND EXISTS (SELECT FROM auth.users AS t WHERE t.id = s.user_id AND t.deleted_at IS NOT NULL)"
        )
    return int(status.split()[-1])


async def held(
    tconn: asyncpg.Connection, name: str, target_key: str, soft: bool = False
) -> tuple[int, list[str]]:
    """After deleting: the gone rows still there (held by rows that stay), counted, and the first keys."""
    alive = "AND t.deleted_at IS NULL" if soft else ""
    rows = await tconn.fetch(
        f"SELECT g.k, count(*) OVER () AS n FROM {GONE} AS g JOIN {table_ident(name)} AS t "
        f"ON {target_key} = g.k {alive} ORDER BY g.k LIMIT {SHOWN}"
    )
    return (rows[0]["n"] if rows else 0), [r["k"] for r in rows]
