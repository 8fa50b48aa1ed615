"""Production deletes: rows and users the target holds because they came from production, gone from it.

**The rule.** A target row (or user) came from production when

- the ledger says a run landed it (``_sync.landed``, and ``_sync.id_map`` for mappings older than the
  ledger: source key → target key), or
- no run landed it and it is older than the copy: its ``created_at`` (else its since-column) is before
  the copy date, the first run's ``--since``. The development copy brought it with production's key.

It is a **production delete** when production has no row with its source key (the ledger's, or for a
row from the copy its own key). Every other target row is development's: never reported, never
touched. A row without a ledger entry and without a date column (or with no copy date known) is
development's, which errs on the side of keeping.

Computed in the databases: the source's keys stream into a temporary table on the target (binary
COPY), the target's rows from production are anti-joined against it, and only counts and the first
keys come back. Applied (``--deletes apply|soft``) children first (the caller passes tables in
reverse FK order), set-based per table; a row that some row not being deleted still references (a
development row in any table, whatever the foreign key's ``ON DELETE`` rule) is kept and reported as
held, so nothing development made is cascaded away or set to NULL. Users are deleted (their
identities and sessions go with them through the auth schema's own cascades), or with ``soft``
marked deleted as the Auth server's soft delete does: ``deleted_at`` set, e-mail, phone and identity
subjects obfuscated, password and tokens cleared, and banned.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import datetime

import asyncpg
from pydantic import BaseModel

from sync.connect import Endpoint, connect
from sync.modes import DeleteMode
from sync.plan import TablePlan
from sync.selection import key_text_sql, target_key_sql
from sync.sqltext import ident, row_of, table_ident

USERS = "auth.users"
SHOWN = 5
_SOURCE_KEYS = "_sync_source_keys"
_GONE = "_sync_gone"


class Deletes(BaseModel):
    """One table's (or the users') production deletes: found, and when applied, deleted or held."""

    table: str
    found: int = 0
    keys: list[str] = []
    """The first target keys found (up to five), in key order."""
    deleted: int = 0
    held: int = 0
    """Not deleted: a row that stays (development's) references them."""
    held_keys: list[str] = []


class DeletesReport(BaseModel):
    """Every table's production deletes and the users', as ``sync plan``, ``run`` and ``verify`` show them."""

    mode: DeleteMode = DeleteMode.REPORT
    copy_date: datetime | None = None
    users: Deletes | None = None
    tables: list[Deletes] = []

    @property
    def found(self) -> int:
        return sum(d.found for d in self.tables) + (self.users.found if self.users else 0)

    @property
    def deleted(self) -> int:
        """Rows and users deleted (or soft-deleted) on the target."""
        return sum(d.deleted for d in self.tables) + (self.users.deleted if self.users else 0)

    def lines(self) -> list[str]:
        """One line per table (and the users) with production deletes: counts, first keys, what was done."""
        lines = []
        for d in [*([self.users] if self.users else []), *self.tables]:
            if not d.found:
                continue
            line = f"{d.table}: {d.found:,} deleted in production (first: {', '.join(d.keys)})"
            if self.mode is not DeleteMode.REPORT:
                done = "marked deleted" if self.mode is DeleteMode.SOFT and d.table == USERS else "deleted"
                line += f"; {d.deleted:,} {done} on the target"
                if d.held:
                    line += (
                        f", {d.held:,} kept because development rows reference them "
                        f"(first: {', '.join(d.held_keys)})"
                    )
            lines.append(line)
        return lines


async def copy_date(tconn: asyncpg.Connection) -> datetime | None:
    """The first run's ``--since``: target rows older than it came with the development copy."""
    if not await tconn.fetchval("SELECT to_regclass('_sync.runs') IS NOT NULL"):
        return None
    return await tconn.fetchval(
        "SELECT since FROM _sync.runs WHERE NOT options ? 'retry' ORDER BY id LIMIT 1"
    )


async def table_deletes(
    sconn: asyncpg.Connection,
    tconn: asyncpg.Connection,
    tp: TablePlan,
    copied: datetime | None,
    mode: DeleteMode = DeleteMode.REPORT,
) -> Deletes:
    """The table's production deletes, inside ``tconn``'s transaction; deleted unless ``mode`` is report.

    ``sconn`` reads the source (in the caller's snapshot); ``copied`` is the copy date (None: only
    rows the ledger knows count).
    """
    to_target = {c.source: c.target for c in tp.columns}
    since = to_target.get(tp.since) if tp.since else None
    dated = next((c for c in ("created_at", since) if c and c in to_target.values()), None)
    source_keys = f"SELECT {key_text_sql(tp)} FROM {table_ident(tp.source_name)}"
    key = target_key_sql(tp, "t.")
    found = await _find(sconn, tconn, tp.name, source_keys, key, dated, copied)
    if mode is DeleteMode.REPORT or not found.found:
        return found
    found.deleted = await _delete(tconn, tp.name, key, skip_schema=None)
    return await _held(tconn, tp.name, key, found)


async def user_deletes(
    sconn: asyncpg.Connection,
    tconn: asyncpg.Connection,
    copied: datetime | None,
    mode: DeleteMode = DeleteMode.REPORT,
) -> tuple[Deletes, set[str]]:
    """The users production deleted, inside ``tconn``'s transaction: the report and every such user id.

    Under ``apply`` they are deleted, under ``soft`` marked deleted; either way not when a row that
    stays references them (identities and other auth-schema rows do not count: they go with the user).
    """
    source_keys = f"SELECT id::text FROM {table_ident(USERS)}"
    found = await _find(sconn, tconn, USERS, source_keys, "t.id::text", "created_at", copied)
    ids = {r["k"] for r in await tconn.fetch(f"SELECT k FROM {_GONE}")}
    if mode is DeleteMode.REPORT or not found.found:
        return found, ids
    if mode is DeleteMode.APPLY:
        found.deleted = await _delete(tconn, USERS, "t.id::text", skip_schema="auth")
    else:
        found.deleted = await _soft_delete(tconn)
    return await _held(tconn, USERS, "t.id::text", found, soft=mode is DeleteMode.SOFT), ids


async def _find(
    sconn: asyncpg.Connection,
    tconn: asyncpg.Connection,
    name: str,
    source_keys: str,
    target_key: str,
    dated: str | None,
    copied: datetime | None,
) -> Deletes:
    """Fill the gone-keys table: target rows from production whose source key production lacks."""
    await tconn.execute(
        f"DROP TABLE IF EXISTS pg_temp.{_SOURCE_KEYS}, pg_temp.{_GONE}; "
        f"CREATE TEMP TABLE {_SOURCE_KEYS} (k text) ON COMMIT DROP"
    )
    await _stream(sconn, tconn, source_keys)
    await tconn.execute(f"ANALYZE {_SOURCE_KEYS}")
    from_copy = f"t.{ident(dated)} < $2" if dated else "$2::timestamptz IS NOT NULL AND false"
    ledgers = [
        f"SELECT source_key, target_key FROM _sync.{t} WHERE table_name = $1"
        for t in ("landed", "id_map")
        if await tconn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"_sync.{t}")
    ] or ["SELECT NULL::text AS source_key, NULL::text AS target_key WHERE $1::text IS NULL"]
    await tconn.execute(
        f"CREATE TEMP TABLE {_GONE} ON COMMIT DROP AS "
        f"SELECT DISTINCT o.k FROM ("
        f"  SELECT {target_key} AS k, "
        f"         coalesce(l.source_key, CASE WHEN {from_copy} THEN {target_key} END) AS s "
        f"  FROM {table_ident(name)} AS t LEFT JOIN ({' UNION '.join(ledgers)}) AS l "
        f"  ON l.target_key = {target_key}"
        f") AS o WHERE o.s IS NOT NULL AND NOT EXISTS (SELECT FROM {_SOURCE_KEYS} AS x WHERE x.k = o.s)",
        name,
        copied,
    )
    rows = await tconn.fetch(f"SELECT k, count(*) OVER () AS n FROM {_GONE} ORDER BY k LIMIT {SHOWN}")
    return Deletes(table=name, found=rows[0]["n"] if rows else 0, keys=[r["k"] for r in rows])


async def _stream(sconn: asyncpg.Connection, tconn: asyncpg.Connection, query: str) -> None:
    """The source's keys (``query``, one text column) into the target's temporary key table, binary."""
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=16)

    async def sink(chunk: bytes) -> None:
        await queue.put(bytes(chunk))

    async def chunks() -> AsyncIterator[bytes]:
        while (chunk := await queue.get()) is not None:
            yield chunk

    async def produce() -> None:
        try:
            await sconn.copy_from_query(query, output=sink, format="binary")
        finally:
            await queue.put(None)

    producer = asyncio.create_task(produce())
    try:
        await tconn.copy_to_table(_SOURCE_KEYS, source=chunks(), format="binary")
    finally:
        await producer


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


async def _delete(tconn: asyncpg.Connection, name: str, target_key: str, skip_schema: str | None) -> int:
    """Delete the gone rows nothing else references; repeated while it progresses (self-references)."""
    referenced = await _still_referenced(tconn, name, skip_schema)
    deleted = 0
    while True:
        status = await tconn.execute(
            f"DELETE FROM {table_ident(name)} AS t USING {_GONE} AS g "
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


async def _soft_delete(tconn: asyncpg.Connection) -> int:
    """Mark the gone users deleted as the Auth server's soft delete does (unless still referenced)."""
    referenced = await _still_referenced(tconn, USERS, "auth")
    subject = _obfuscated("i.user_id", "i.provider || ':' || i.provider_id")
    email = _obfuscated("t.id", "coalesce(t.email, '')")
    phone = _obfuscated("t.id", "coalesce(t.phone, '')")
    await tconn.execute(
        f"UPDATE auth.identities AS i SET provider_id = {subject} "
        f"FROM {_GONE} AS g, auth.users AS t WHERE t.id::text = g.k AND i.user_id = t.id "
        f"AND t.deleted_at IS NULL AND NOT ({referenced})"
    )
    status = await tconn.execute(
        f"UPDATE auth.users AS t SET deleted_at = now(), banned_until = now() + interval '876000 hours', "
        f"email = {email}, phone = left({phone}, 15), "
        f"email_change = '', phone_change = '', encrypted_password = '', confirmation_token = '', "
        f"recovery_token = '', email_change_token_current = '', email_change_token_new = '', "
        f"phone_change_token = '', reauthentication_token = '', updated_at = now() "
        f"FROM {_GONE} AS g WHERE t.id::text = g.k AND t.deleted_at IS NULL AND NOT ({referenced})"
    )
    if await tconn.fetchval("SELECT to_regclass('auth.sessions') IS NOT NULL"):
        await tconn.execute(
            f"DELETE FROM auth.sessions AS s USING {_GONE} AS g WHERE s.user_id::text = g.k "
            f"AND EXISTS (SELECT FROM auth.users AS t WHERE t.id = s.user_id AND t.deleted_at IS NOT NULL)"
        )
    return int(status.split()[-1])


async def _held(
    tconn: asyncpg.Connection, name: str, target_key: str, found: Deletes, soft: bool = False
) -> Deletes:
    """After deleting: the gone rows still there (held by rows that stay), counted and named."""
    alive = "AND t.deleted_at IS NULL" if soft else ""
    rows = await tconn.fetch(
        f"SELECT g.k, count(*) OVER () AS n FROM {_GONE} AS g JOIN {table_ident(name)} AS t "
        f"ON {target_key} = g.k {alive} ORDER BY g.k LIMIT {SHOWN}"
    )
    found.held = rows[0]["n"] if rows else 0
    found.held_keys = [r["k"] for r in rows]
    return found


async def production_deletes(
    sconn: asyncpg.Connection,
    tconn: asyncpg.Connection,
    tables: Sequence[TablePlan],
    copied: datetime | None,
    mode: DeleteMode = DeleteMode.REPORT,
) -> tuple[DeletesReport, set[str]]:
    """Every table's production deletes (children first) and then the users', in ``tconn``'s transaction.

    ``tables`` come parents first, as the plan orders them. Returns the report and the ids of every
    target user production deleted (the auth import must not hand such an account to anyone else).
    Under ``report`` the caller rolls the transaction back; it holds only temporary tables.
    """
    report = DeletesReport(mode=mode, copy_date=copied)
    for tp in reversed(tables):
        report.tables.insert(0, await table_deletes(sconn, tconn, tp, copied, mode))
    gone: set[str] = set()
    if await tconn.fetchval("SELECT to_regclass('auth.users') IS NOT NULL"):
        report.users, gone = await user_deletes(sconn, tconn, copied, mode)
    return report, gone


async def find_deletes(
    sconn: asyncpg.Connection,
    target: Endpoint,
    tables: Sequence[TablePlan],
    copied: datetime | None = None,
    mode: DeleteMode = DeleteMode.REPORT,
) -> tuple[DeletesReport, set[str]]:
    """:func:`production_deletes` on a target connection of its own; committed only when applying.

    ``copied`` defaults to the first run's ``--since`` recorded on the target.
    """
    tconn = await connect(target, application_name="sync deletes")
    try:
        transaction = tconn.transaction()
        await transaction.start()
        try:
            if copied is None:
                copied = await copy_date(tconn)
            found = await production_deletes(sconn, tconn, tables, copied, mode)
        except BaseException:
            await transaction.rollback()
            raise
        if mode is DeleteMode.REPORT:
            await transaction.rollback()
        else:
            await transaction.commit()
        return found
    finally:
        await tconn.close()
