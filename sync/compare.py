"""Equality of two row sets that live in different databases, computed in the databases.

Each side describes its rows as a :class:`Relation`: a key and named columns, all as text in one
canonical form (the source's key space, the target's type text). Rows are spread over buckets by a
hash of their key; each side returns one line per bucket (row count and the sum of 64-bit row hashes),
which is one scan per side. Only the buckets whose lines differ are read again as each row's key and
hash (a second scan, returning only those buckets' keys); only the keys on both sides whose hashes
differ are then read whole and compared column by column. An equal table therefore costs one
aggregate scan on each side; rows on one side only cost their keys, a different row its columns.

The same buckets describe a set of keys alone (a :class:`Relation` without columns): one line per
bucket of key count and key-hash sum, so two key sets that differ only a little differ in only a few
buckets, and those alone need their keys compared (production deletes do that).

Keys and rows are hashed with ``hashtextextended``, PostgreSQL's own 64-bit text hash (the one behind
hash indexes and hash partitions, kept stable across major versions so that ``pg_upgrade`` can keep
them): several times cheaper than an md5 in SQL. :func:`same_hashes` checks that both servers compute
it alike (they do unless one is big-endian); when they do not, everything goes into one bucket, which
is slow but still exact.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import asyncpg

from sync.connect import both
from sync.sqltext import Params, table_ident

ROWS_PER_BUCKET = 32
MAX_BUCKETS = 1 << 16
BUCKETS_PER_READ = 4096
"""Differing buckets whose row hashes are read back per statement (a key and a hash a row)."""
ROWS_PER_READ = 5000
"""Rows read whole per statement, when their hashes differ."""


@dataclass
class Relation:
    """One side's rows: ``key`` and each column are SQL text expressions over ``from_sql``.

    ``params`` holds the values the expressions bind. ``where`` keeps the rows in scope.
    """

    from_sql: str
    key: str
    columns: list[tuple[str, str]]
    where: str = "true"
    params: Params = field(default_factory=Params)

    def rows_sql(self) -> str:
        """Each row in scope as ``k`` and ``c0``, ``c1``, … (text)."""
        cols = "".join(f", ({expr})::text AS c{i}" for i, (_, expr) in enumerate(self.columns))
        return f"SELECT ({self.key})::text AS k{cols} FROM {self.from_sql} WHERE {self.where}"


@dataclass
class Comparison:
    """How the source's rows compare with the target's, keys in the source's key space."""

    in_scope: int = 0
    missing: list[str] = field(default_factory=list)
    different: dict[str, list[str]] = field(default_factory=dict)
    """Key → the names of the columns whose values differ."""
    only_on_target: list[str] = field(default_factory=list)
    held: list[str] = field(default_factory=list)
    """Source keys the caller said are not landed (quarantined): never counted equal."""


Matcher = Callable[[str | None, str | None], bool]
"""Whether a target value (second) stands for the source's (first), for a column compared loosely."""


def _same(source: str | None, target: str | None) -> bool:
    return source == target


_EXACT: Mapping[str, Matcher] = {}


def bucket_count(estimated_rows: float) -> int:
    """How many buckets a table of about ``estimated_rows`` rows is spread over."""
    return max(1, min(MAX_BUCKETS, int(max(estimated_rows, 0)) // ROWS_PER_BUCKET))


async def _reltuples(conn: asyncpg.Connection, table: str) -> float | None:
    """``pg_class.reltuples`` of ``table``: -1 when its statistics were never gathered, None when there
    is no such table."""
    return await conn.fetchval("SELECT reltuples FROM pg_class WHERE oid = to_regclass($1)", table)


async def analyzed_rows(conn: asyncpg.Connection, table: str) -> float | None:
    """How many rows ``table`` held when its statistics were last gathered (None: never, or no table)."""
    rows = await _reltuples(conn, table)
    return None if rows is None or rows < 0 else float(rows)


async def estimate_rows(conn: asyncpg.Connection, table: str) -> float:
    """About how many rows ``table`` holds: its statistics, or for a table never analyzed (-1 there,
    which would put every row in one bucket) the planner's guess from its size."""
    rows = await _reltuples(conn, table)
    if rows is None:
        return -1.0
    if rows >= 0:
        return float(rows)
    plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) SELECT 1 FROM {table_ident(table)}")
    return float(json.loads(plan)[0]["Plan"]["Plan Rows"])


_HASH_PROBE = "sync 0123456789 abcdefghijklmnopqrstuvwxyz"
"""Hashed on both sides to tell whether they agree (longer than one hashing block)."""


def _hash_sql(text: str) -> str:
    return f"hashtextextended({text}, 0)"


def _bucket_sql(key: str, buckets: int) -> str:
    # The hash's top bits dropped, so ``b`` of ``n * m`` buckets lies in bucket ``b % n`` of ``n``.
    return f"(({_hash_sql(key)} & {(1 << 62) - 1}) % {int(buckets)})"


def _row_hash_sql(count: int) -> str:
    fields = ", ".join(["k", *(f"c{i}" for i in range(count))])
    return _hash_sql(f"ROW({fields})::text")


async def same_hashes(sconn: asyncpg.Connection, tconn: asyncpg.Connection) -> bool:
    """Whether both servers hash text alike (same hash, same encoding): a key lies in one bucket on both."""
    sql = f"SELECT {_hash_sql('$1::text')}::text || ' ' || current_setting('server_encoding')"
    source, target = await both(sconn.fetchval(sql, _HASH_PROBE), tconn.fetchval(sql, _HASH_PROBE))
    return bool(source == target)


@dataclass(frozen=True)
class Buckets:
    """Some of the buckets a key space is spread over: ``numbers`` among ``count`` buckets."""

    count: int
    numbers: tuple[int, ...]

    def sql(self, key: str, params: Params) -> str:
        """True when the key (SQL text) lies in one of these buckets."""
        return f"{_bucket_sql(key, self.count)} = ANY({params.bind(list(self.numbers), 'bigint[]')})"


async def bucket_sums(conn: asyncpg.Connection, rel: Relation, buckets: int) -> dict[int, tuple[int, str]]:
    """One line per bucket holding rows of ``rel``: its row count and the sum of its rows' hashes."""
    sql = (
        f"SELECT {_bucket_sql('q.k', buckets)} AS b, count(*) AS n, "
        f"sum({_row_hash_sql(len(rel.columns))})::text AS s FROM ({rel.rows_sql()}) AS q GROUP BY 1"
    )
    return {r["b"]: (r["n"], r["s"]) for r in await conn.fetch(sql, *rel.params.values)}


async def _buckets_of(conn: asyncpg.Connection, keys: Iterable[str], buckets: int) -> set[int]:
    sql = f"SELECT DISTINCT {_bucket_sql('k', buckets)} AS b FROM unnest($1::text[]) AS k"
    return {r["b"] for r in await conn.fetch(sql, list(keys))}


async def _hashes_in(conn: asyncpg.Connection, rel: Relation, buckets: int, wanted: Sequence[int]) -> dict:
    """Key → row hash of every row in the ``wanted`` buckets."""
    slot = f"${len(rel.params.values) + 1}::bigint[]"
    sql = (
        f"SELECT q.k, {_row_hash_sql(len(rel.columns))} AS h FROM ({rel.rows_sql()}) AS q "
        f"WHERE {_bucket_sql('q.k', buckets)} = ANY({slot})"
    )
    return {r["k"]: r["h"] for r in await conn.fetch(sql, *rel.params.values, list(wanted))}


async def _rows_of(conn: asyncpg.Connection, rel: Relation, keys: Sequence[str]) -> dict:
    """Key → column values of the rows with these keys."""
    slot = f"${len(rel.params.values) + 1}::text[]"
    sql = f"SELECT * FROM ({rel.rows_sql()}) AS q WHERE q.k = ANY({slot})"
    rows: dict[str, list[str | None]] = {}
    for r in await conn.fetch(sql, *rel.params.values, list(keys)):
        rows[r["k"]] = [r[f"c{i}"] for i in range(len(rel.columns))]
    return rows


async def compare(
    sconn: asyncpg.Connection,
    tconn: asyncpg.Connection,
    source: Relation,
    target: Relation,
    *,
    buckets: int,
    held: Iterable[str] = (),
    matchers: Mapping[str, Matcher] = _EXACT,
) -> Comparison:
    """Compare ``source`` with ``target`` row by row, reading back only the buckets that differ.

    ``held`` keys (quarantined rows) are reported as held whatever the target holds under them.
    ``matchers`` say, per column name, when a target value stands for the source's (default: equal).
    """
    names = [name for name, _ in source.columns]
    held = set(held)
    if not await same_hashes(sconn, tconn):
        buckets = 1
    src, tgt = await bucket_sums(sconn, source, buckets), await bucket_sums(tconn, target, buckets)
    result = Comparison(in_scope=sum(n for n, _ in src.values()))
    differing = {b for b in src.keys() | tgt.keys() if src.get(b) != tgt.get(b)}
    if held:
        differing |= await _buckets_of(tconn, held, buckets)
    ordered = sorted(differing)
    for start in range(0, len(ordered), BUCKETS_PER_READ):
        wanted = ordered[start : start + BUCKETS_PER_READ]
        shash, thash = (
            await _hashes_in(sconn, source, buckets, wanted),
            await _hashes_in(tconn, target, buckets, wanted),
        )
        result.held += [k for k in shash if k in held]
        result.missing += [k for k in shash if k not in held and k not in thash]
        result.only_on_target += [k for k in thash if k not in shash]
        unlike = sorted(k for k, h in shash.items() if k not in held and k in thash and thash[k] != h)
        for first in range(0, len(unlike), ROWS_PER_READ):
            keys = unlike[first : first + ROWS_PER_READ]
            srows, trows = await _rows_of(sconn, source, keys), await _rows_of(tconn, target, keys)
            for key in keys:
                if key not in trows:  # gone from the target since its hash was read
                    result.missing.append(key)
                    continue
                cols = [
                    names[i]
                    for i, (s, t) in enumerate(zip(srows[key], trows[key], strict=True))
                    if s != t and not matchers.get(names[i], _same)(s, t)
                ]
                if cols:
                    result.different[key] = cols
    for keys in (result.missing, result.held, result.only_on_target):
        keys.sort()
    return result
