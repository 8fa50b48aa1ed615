"""Which Storage objects a run copies, where each lands, and which are already there.

Two kinds of rules name the objects:

* a table column holding object paths (:class:`ColumnRule`): the objects that the table's rows
  reference, for every source row the target holds (found by key, through the id map for remapped
  keys), so a row copied now or in an earlier run always has its file;
* a whole bucket (:class:`BucketRule`): every object of the bucket, or those updated since ``--since``.

With ``owner_prefix`` the first path segment is a user id (Supabase's usual RLS layout,
``<uid>/file.pdf``): a user matched to another target id (a person who registered again) has their
objects written under the target id, and the referencing rows are pointed there.

Everything here is read with SQL (``storage.objects`` and ``storage.buckets`` on both sides, the
target's rows and ``_sync`` state), never written: object metadata is what the Storage server keeps
(``metadata.size``, ``metadata.eTag``, ``metadata.mimetype``, ``metadata.cacheControl``), and the bytes
themselves only ever move through the Storage API.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from sync.sqltext import Params, ident, table_ident
from sync.storage.client import Bucket

CHUNK = 2000
USERS = "auth.users"


@dataclass(frozen=True)
class ColumnRule:
    """A table column that holds object paths in ``bucket``.

    ``table``/``key``/``column`` name the target's table, its single-column primary key and the path
    column; ``source_table``/``source_key``/``source_column`` the source's (they differ after renames).
    ``map_tables`` are the ``_sync.id_map`` names under which remapped keys of the table are stored.
    """

    table: str
    key: str
    column: str
    bucket: str
    owner_prefix: bool = False
    source_table: str = ""
    source_key: str = ""
    source_column: str = ""
    map_tables: tuple[str, ...] = ()

    @property
    def source(self) -> tuple[str, str, str]:
        """``(table, key, column)`` on the source."""
        return (
            self.source_table or self.table,
            self.source_key or self.key,
            self.source_column or self.column,
        )


@dataclass(frozen=True)
class BucketRule:
    """A whole bucket: every object, or those updated at or after ``since`` when it is given."""

    bucket: str
    owner_prefix: bool = False


@dataclass(frozen=True)
class StorageRules:
    """What the mapping asks for: path columns of tables, and whole buckets."""

    columns: tuple[ColumnRule, ...] = ()
    buckets: tuple[BucketRule, ...] = ()

    @property
    def bucket_ids(self) -> list[str]:
        """Every bucket the rules touch, in a stable order."""
        return sorted({r.bucket for r in self.columns} | {b.bucket for b in self.buckets})

    def __bool__(self) -> bool:
        return bool(self.columns or self.buckets)


@dataclass(frozen=True)
class ObjectMeta:
    """What the Storage server keeps about an object's content."""

    size: int
    etag: str | None
    mimetype: str
    cache_control: str | None
    user_metadata: dict[str, Any] | None

    @classmethod
    def from_row(cls, metadata: Any, user_metadata: Any) -> ObjectMeta | None:
        """From ``storage.objects.metadata`` (jsonb) and ``user_metadata``; None without a size."""
        md = _json(metadata)
        if not isinstance(md, dict) or md.get("size") is None:
            return None
        user = _json(user_metadata)
        return cls(
            size=int(md["size"]),
            etag=md.get("eTag"),
            mimetype=md.get("mimetype") or "application/octet-stream",
            cache_control=md.get("cacheControl"),
            user_metadata=user if isinstance(user, dict) else None,
        )


@dataclass
class Landed:
    """The checkpoint of an object that landed: what the source and target held then."""

    source_etag: str | None
    size: int
    target_etag: str | None
    md5: str


@dataclass
class Wanted:
    """One object to have on the target: its source and target places, and what each side holds now.

    ``rows`` are the target keys (as text) of rows whose path column must be pointed at ``target_path``
    once the object is there (rows still holding the source path of a remapped owner).
    """

    bucket: str
    path: str
    target_path: str
    source: ObjectMeta | None
    target: ObjectMeta | None = None
    landed: Landed | None = None
    rule: ColumnRule | None = None
    rows: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        """``bucket/target_path``: the object's name in reports and quarantine."""
        return f"{self.bucket}/{self.target_path}"

    @property
    def present(self) -> bool:
        """True when the target already holds the source's content at ``target_path``."""
        src, tgt = self.source, self.target
        if src is None or tgt is None or src.size != tgt.size:
            return False
        if src.etag and src.etag == tgt.etag:
            return True
        landed = self.landed
        return (
            landed is not None
            and landed.source_etag == src.etag
            and landed.size == src.size
            and landed.target_etag == tgt.etag
        )


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def owner_rewrite(path: str, users: dict[str, str]) -> str:
    """``path`` with its first segment replaced by the mapped user id, when the id map has one."""
    head, sep, rest = path.partition("/")
    mapped = users.get(head)
    return f"{mapped}{sep}{rest}" if mapped is not None and sep else path


async def _has_state(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval("SELECT to_regclass('_sync.id_map') IS NOT NULL"))


async def _user_map(tconn: asyncpg.Connection, heads: Sequence[str], has_state: bool) -> dict[str, str]:
    if not has_state or not heads:
        return {}
    rows = await tconn.fetch(
        "SELECT source_key, target_key FROM _sync.id_map "
        "WHERE table_name = $1 AND source_key = ANY($2::text[])",
        USERS,
        list(set(heads)),
    )
    return {r["source_key"]: r["target_key"] for r in rows}


async def _target_rows(
    tconn: asyncpg.Connection, rule: ColumnRule, keys: list[str], has_state: bool
) -> dict[str, tuple[str, str | None]]:
    """Source key → (target key, target path) for the source keys the target holds."""
    key_type = await tconn.fetchval(
        "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute AS a "
        "WHERE a.attrelid = $1::regclass AND a.attname = $2",
        table_ident(rule.table),
        rule.key,
    )
    mapped = (
        "coalesce((SELECT m.target_key FROM _sync.id_map AS m "
        "WHERE m.table_name = ANY($2::text[]) AND m.source_key = s.k LIMIT 1), s.k)"
        if has_state and rule.map_tables
        else "s.k"
    )
    rows = await tconn.fetch(
        f"SELECT s.k, t.{ident(rule.key)}::text AS tk, t.{ident(rule.column)}::text AS tpath "
        f"FROM unnest($1::text[]) AS s(k) "
        f"JOIN {table_ident(rule.table)} AS t ON t.{ident(rule.key)} = ({mapped})::{key_type}",
        keys,
        *([list(rule.map_tables)] if has_state and rule.map_tables else []),
    )
    return {r["k"]: (r["tk"], r["tpath"]) for r in rows}


async def _fill_target(
    tconn: asyncpg.Connection, bucket: str, wanted: dict[str, Wanted], has_state: bool
) -> None:
    """Attach the target's object metadata and the landed checkpoints to ``wanted`` (by target path)."""
    paths = list(wanted)
    for r in await tconn.fetch(
        "SELECT name, metadata, user_metadata FROM storage.objects "
        "WHERE bucket_id = $1 AND name = ANY($2::text[])",
        bucket,
        paths,
    ):
        wanted[r["name"]].target = ObjectMeta.from_row(r["metadata"], r["user_metadata"])
    if not has_state or not await tconn.fetchval("SELECT to_regclass('_sync.storage_objects') IS NOT NULL"):
        return
    for r in await tconn.fetch(
        "SELECT target_path, source_etag, size, target_etag, md5 FROM _sync.storage_objects "
        "WHERE bucket = $1 AND target_path = ANY($2::text[])",
        bucket,
        paths,
    ):
        wanted[r["target_path"]].landed = Landed(r["source_etag"], r["size"], r["target_etag"], r["md5"])


Upcoming = Callable[[Params, str], str]
"""SQL (over the source table, alias given) for rows a run is about to copy, values bound in the Params."""


async def referenced_objects(
    sconn: asyncpg.Connection, tconn: asyncpg.Connection, rule: ColumnRule, upcoming: Upcoming | None = None
) -> AsyncIterator[list[Wanted]]:
    """The objects that rows of ``rule.table`` on the target reference, in batches, one entry per object.

    ``upcoming`` (for ``sync plan``, before the run) adds the source rows the run would copy that the
    target does not hold yet.
    """
    has_state = await _has_state(tconn)
    table, key, column = rule.source
    params = Params()
    bucket = params.bind(rule.bucket, "text")
    in_run = upcoming(params, "t.") if upcoming is not None else "false"
    seen: set[str] = set()
    async with _reading(sconn):
        cursor = await sconn.cursor(
            f"SELECT t.{ident(key)}::text AS k, t.{ident(column)}::text AS path, o.metadata, "
            f"o.user_metadata, {in_run} AS in_run FROM {table_ident(table)} AS t "
            f"LEFT JOIN storage.objects AS o ON o.bucket_id = {bucket} AND o.name = t.{ident(column)}::text "
            f"WHERE t.{ident(column)} IS NOT NULL ORDER BY t.{ident(key)}",
            *params.values,
        )
        while chunk := await cursor.fetch(CHUNK):
            present = await _target_rows(tconn, rule, [r["k"] for r in chunk], has_state)
            users = (
                await _user_map(tconn, [r["path"].partition("/")[0] for r in chunk], has_state)
                if rule.owner_prefix
                else {}
            )
            batch: dict[str, Wanted] = {}
            for r in chunk:
                if r["k"] not in present and not r["in_run"]:
                    continue  # not on the target (not copied, quarantined, or deleted there)
                target_key, target_path_now = present.get(r["k"], (None, None))
                path = r["path"]
                target_path = owner_rewrite(path, users)
                if target_key is not None and target_path_now not in (path, target_path):
                    if not r["in_run"]:
                        continue  # the target row points at another file: it is the target's own choice
                    target_key = None  # another row holds the key now; the run gives this one its own
                entry = batch.get(target_path)
                if entry is None:
                    if target_path in seen:
                        continue
                    meta = ObjectMeta.from_row(r["metadata"], r["user_metadata"])
                    entry = Wanted(rule.bucket, path, target_path, meta, rule=rule)
                    batch[target_path] = entry
                if target_key is not None and target_path_now != target_path:
                    entry.rows.append(target_key)
            seen.update(batch)
            if batch:
                await _fill_target(tconn, rule.bucket, batch, has_state)
                yield list(batch.values())


async def bucket_objects(
    sconn: asyncpg.Connection, tconn: asyncpg.Connection, rule: BucketRule, since: datetime | None
) -> AsyncIterator[list[Wanted]]:
    """Every object of a bucket (updated at or after ``since`` when given), in batches."""
    has_state = await _has_state(tconn)
    async with _reading(sconn):
        cursor = await sconn.cursor(
            "SELECT name, metadata, user_metadata FROM storage.objects "
            "WHERE bucket_id = $1 AND ($2::timestamptz IS NULL OR updated_at >= $2) ORDER BY name",
            rule.bucket,
            since,
        )
        while chunk := await cursor.fetch(CHUNK):
            users = (
                await _user_map(tconn, [r["name"].partition("/")[0] for r in chunk], has_state)
                if rule.owner_prefix
                else {}
            )
            batch = {}
            for r in chunk:
                target_path = owner_rewrite(r["name"], users)
                meta = ObjectMeta.from_row(r["metadata"], r["user_metadata"])
                batch[target_path] = Wanted(rule.bucket, r["name"], target_path, meta)
            await _fill_target(tconn, rule.bucket, batch, has_state)
            yield list(batch.values())


async def bucket_settings(conn: asyncpg.Connection, buckets: Sequence[str]) -> dict[str, Bucket]:
    """The settings of the named buckets that exist, from ``storage.buckets``."""
    rows = await conn.fetch(
        "SELECT id, public, file_size_limit, allowed_mime_types FROM storage.buckets "
        "WHERE id = ANY($1::text[])",
        list(buckets),
    )
    return {r["id"]: Bucket.from_json(dict(r)) for r in rows}


@contextlib.asynccontextmanager
async def _reading(conn: asyncpg.Connection) -> AsyncIterator[None]:
    """A read-only transaction for a cursor, unless ``conn`` is already in one (a run's snapshot)."""
    if conn.is_in_transaction():
        yield
        return
    async with conn.transaction(readonly=True):
        yield
