"""After a run: is every production row and user on the target, and can every user still log in?

Read-only on both sides. Per table: the source keys in the window (or the whole table), checked in
chunks against the target through the id map, and the target's orphans (rows whose parent is
missing). For auth: every source user has a target user (same id, or mapped), with the same password
hash, and in a shape the Auth server can load (no NULL in the columns it scans as strings, the nil
instance id, an audience, a lower-case e-mail, an e-mail identity for e-mail users).
"""

from __future__ import annotations

from datetime import datetime

import asyncpg
from pydantic import BaseModel

from sync.auth import STRING_COLUMNS
from sync.connect import Endpoint, connect
from sync.plan import Plan
from sync.selection import Selection, key_owners, key_text_sql, source_key_columns
from sync.sqltext import Params, column_list, ident, row_of, table_ident
from sync.storage.check import StorageCheck, check_storage
from sync.storage.select import StorageRules

CHUNK = 10_000


class TableCheck(BaseModel):
    """One table: source rows looked for, those the target lacks, and the target's orphans."""

    table: str
    source_rows: int
    missing: int
    orphans: int
    missing_examples: list[str] = []


class UserCheck(BaseModel):
    """Auth users: missing on the target, a different password hash, or a shape that breaks login."""

    source_users: int
    missing: int
    other_hash: int
    unloadable: int
    without_email_identity: int
    examples: list[str] = []


class VerifyReport(BaseModel):
    """``sync verify --json``."""

    since: datetime | None
    users: UserCheck
    tables: list[TableCheck]
    files: StorageCheck | None = None
    """Set when the mapping names Storage objects: each copied row's file, by size and hash."""

    @property
    def ok(self) -> bool:
        return (
            not (self.users.missing or self.users.other_hash or self.users.unloadable)
            and not self.users.without_email_identity
            and all(t.missing == 0 and t.orphans == 0 for t in self.tables)
            and (self.files is None or self.files.ok)
        )


async def verify(
    source: Endpoint,
    target: Endpoint,
    plan: Plan,
    since: datetime | None,
    storage: StorageRules | None = None,
) -> VerifyReport:
    """Check the target against the source (and the files ``storage`` names); writes nothing."""
    sconn, tconn = await connect(source, application_name="sync verify"), await connect(target)
    try:
        async with (
            sconn.transaction(isolation="repeatable_read", readonly=True),
            tconn.transaction(readonly=True),
        ):
            users = await _check_users(sconn, tconn)
            tables = [await _check_table(sconn, tconn, plan, t.name, since) for t in plan.tables]
            files = await check_storage(sconn, tconn, storage, since) if storage else None
        return VerifyReport(since=since, users=users, tables=tables, files=files)
    finally:
        await sconn.close()
        await tconn.close()


async def _absent(
    tconn: asyncpg.Connection, target_table: str, key: str, owners: list[str], keys: list[str]
) -> list[str]:
    """The source keys (as text) with no target row, by the same key or through the id map."""
    mapped = (
        "coalesce((SELECT m.target_key FROM _sync.id_map AS m "
        "WHERE m.table_name = ANY($2::text[]) AND m.source_key = k LIMIT 1), k)"
        if owners
        else "k"
    )
    rows = await tconn.fetch(
        f"SELECT k FROM unnest($1::text[]) AS k WHERE NOT EXISTS "
        f"(SELECT 1 FROM {table_ident(target_table)} AS t WHERE t.{ident(key)}::text = {mapped})",
        keys,
        *([owners] if owners else []),
    )
    return [r["k"] for r in rows]


async def _check_table(
    sconn: asyncpg.Connection, tconn: asyncpg.Connection, plan: Plan, name: str, since: datetime | None
) -> TableCheck:
    tp = next(t for t in plan.tables if t.name == name)
    owners = key_owners(plan, name)
    has_map = await tconn.fetchval("SELECT to_regclass('_sync.id_map') IS NOT NULL")
    params = Params()
    selected = Selection(plan, since).selected(tp, params)
    source_rows, missing = 0, []
    cursor = await sconn.cursor(
        f"SELECT {key_text_sql(tp)} AS k FROM {table_ident(tp.source_name)} WHERE {selected} "
        f"ORDER BY {column_list(source_key_columns(tp))}",
        *params.values,
    )
    while chunk := await cursor.fetch(CHUNK):
        keys = [r["k"] for r in chunk]
        source_rows += len(keys)
        if len(tp.row_key) == 1:
            # A natural key is the target's own value: it never goes through the id map.
            mapped = owners if has_map and tp.key != "natural" else []
            missing += await _absent(tconn, name, tp.row_key[0], mapped, keys)
    orphans = 0
    for link in tp.parents:
        present = " AND ".join(f"c.{ident(col)} IS NOT NULL" for col in link.columns)
        orphans += await tconn.fetchval(
            f"SELECT count(*) FROM {table_ident(name)} AS c WHERE {present} AND NOT EXISTS "
            f"(SELECT 1 FROM {table_ident(link.parent)} AS p "
            f"WHERE {row_of(link.parent_columns, 'p.')} = {row_of(link.columns, 'c.')})"
        )
    return TableCheck(
        table=name,
        source_rows=source_rows,
        missing=len(missing),
        orphans=orphans,
        missing_examples=missing[:5],
    )


async def _check_users(sconn: asyncpg.Connection, tconn: asyncpg.Connection) -> UserCheck:
    has_map = await tconn.fetchval("SELECT to_regclass('_sync.id_map') IS NOT NULL")
    rows = (
        await tconn.fetch("SELECT source_key, target_key FROM _sync.id_map WHERE table_name = 'auth.users'")
        if has_map
        else []
    )
    mapped = {r["source_key"]: r["target_key"] for r in rows}
    check = UserCheck(source_users=0, missing=0, other_hash=0, unloadable=0, without_email_identity=0)
    cursor = await sconn.cursor(
        "SELECT id::text AS id, encrypted_password AS hash FROM auth.users ORDER BY id"
    )
    while chunk := await cursor.fetch(CHUNK):
        check.source_users += len(chunk)
        wanted = {mapped.get(r["id"], r["id"]): r for r in chunk}
        by_id = {r["id"]: r for r in await tconn.fetch(_TARGET_USERS, list(wanted))}
        for target_id, source in wanted.items():
            row = by_id.get(target_id)
            if row is None:
                check.missing += 1
                check.examples.append(f"{source['id']}: no target user")
                continue
            if source["hash"] and row["hash"] != source["hash"]:
                check.other_hash += 1
                check.examples.append(f"{source['id']}: the target's password hash differs")
            check.unloadable += int(row["unloadable"])
            check.without_email_identity += int(row["no_identity"])
    check.examples = check.examples[:10]
    return check


# What makes the Auth server fail to load a user, or not find it (reference/supabase-auth.md §2.2, §4).
_TARGET_USERS = f"""
SELECT u.id::text AS id, u.encrypted_password AS hash,
       ({" OR ".join(f"u.{ident(c)} IS NULL" for c in STRING_COLUMNS)}
        OR u.email_change_confirm_status IS NULL OR u.created_at IS NULL OR u.updated_at IS NULL
        OR u.instance_id IS DISTINCT FROM '00000000-0000-0000-0000-000000000000'::uuid
        OR u.email IS DISTINCT FROM lower(u.email)) AS unloadable,
       (u.email IS NOT NULL AND NOT u.is_sso_user AND NOT EXISTS (
           SELECT 1 FROM auth.identities AS i WHERE i.user_id = u.id AND i.provider = 'email')) AS no_identity
FROM auth.users AS u WHERE u.id = ANY($1::uuid[])
"""
