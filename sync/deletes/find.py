"""Finding production deletes in the databases, at a cost that follows how much differs.

The question, per table: which target rows from production (a ledger pair source key → target key,
or a row dated before the copy under its own key) have a source key production no longer holds. The
answer is the anti-join of those rows against every source key, but the keys do not travel unless
they must. Each side first sums its keys per bucket (:mod:`sync.compare`): the source all its
keys (an index-only scan where the key index allows), the target the source keys of its rows from
production. A bucket whose count and key-hash sum are equal on both sides holds no production delete;
one with no target key cannot hold one either. Only the remaining buckets are resolved key by key:
their source keys stream into a temporary table on the target (binary COPY) and the target's rows
from production in those buckets are anti-joined against it, so buckets that differ for other reasons
(rows production has and the target does not yet, production rows development deleted) give exactly
the answer a comparison of every key gives. A differing bucket with many keys is first split into
finer buckets, so a few deletes in a large table cost the keys of a few small buckets. Only counts
and the first keys come back to Python; the target keys found stay in :data:`GONE` for the caller.

Most runs need not compare a key at all (:class:`Basis`): when the previous run ended having read
everything in one snapshot and left no production delete of a table on the target, every target row
from production has a source key that snapshot held. If every row version that snapshot saw is still
in the source (one count over the table: its rows now that the snapshot saw, against its rows then),
none of those keys is gone, and the table has no production delete.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from sync.auth.columns import USERS_TABLE
from sync.census import Tally, changed_since, tallied, tally
from sync.compare import (
    ROWS_PER_BUCKET,
    Buckets,
    Relation,
    analyzed_rows,
    bucket_count,
    bucket_sums,
    estimate_rows,
    same_hashes,
)
from sync.connect import both
from sync.deletes.basis import Basis
from sync.pipe import pipe_copy
from sync.selection import Changes
from sync.sqltext import Params, ident, table_ident

SHOWN = 5
"""Keys shown per table."""
GONE = "_sync_gone"
"""The temporary table (``k``: target keys) the last :meth:`Finder.find` that found some filled."""
_SOURCE_KEYS = "_sync_source_keys"
SPLIT_AT = 2048
"""A differing bucket with more keys than this is split into finer buckets before its keys are read."""
MOSTLY_OF = 16
"""When more than half of this many buckets (or more) differ, their keys are read without a finer sum."""
SURPLUS_PER_BUCKET = 3
"""Source rows beyond the target's per bucket from which nearly every bucket differs (see ``_outgrown``)."""
FINEST = 1 << 40
"""No finer spread than this: a bucket still large there holds equal hashes (the same key many times)."""

KeySet = Callable[[Params], str]
"""SQL of a set of keys as one text column ``k``, its values bound into the statement's parameters."""


@dataclass(frozen=True)
class Found:
    """A table's production deletes: how many target rows, and the first target keys in key order."""

    count: int
    keys: list[str]
    read: int = 0
    """Source keys read to find them: those of the buckets whose sums differ."""
    source_rows: int | None = None
    """The source table's rows in the snapshot read (what the next run's count is held against)."""
    counted: bool = False
    """Settled by the count against the previous run's basis: no key was compared."""


# The target's ledgers of landed rows, looked for with the users' table.
LANDED = "_sync.landed"
LEDGERS = (LANDED, "_sync.id_map")


@dataclass(frozen=True)
class Finder:
    """Both sides of one search (inside the caller's transactions), and what holds for every table."""

    sconn: asyncpg.Connection
    tconn: asyncpg.Connection
    copied: datetime | None
    """The copy date (rows dated before it came with the development copy); None: only the ledger counts."""
    ledgers: tuple[str, ...]
    """The target's ledgers of landed rows (``source_key`` → ``target_key`` per ``table_name``)."""
    splits: bool
    """Both servers hash alike, so buckets mean the same on both sides (else: one bucket, every key)."""
    since: Changes | None = None
    """From the previous run's basis snapshot to the one read now, with what that run left per table."""
    basis: Basis | None = None
    tallies: Mapping[str, Tally] = field(default_factory=dict)
    """The run's census, when it took one: the counts are there already."""
    users: bool = True
    """The target has ``auth.users``."""

    @classmethod
    async def open(
        cls,
        sconn: asyncpg.Connection,
        tconn: asyncpg.Connection,
        copied: datetime | None,
        basis: Basis | None = None,
        tallies: Mapping[str, Tally] | None = None,
    ) -> Finder:
        async def since_basis() -> Changes | None:
            if basis is None:
                return None
            upto = await sconn.fetchval("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint")
            return Changes.since_snapshot(basis.snapshot, upto)

        present, since = await both(
            tconn.fetch(
                "SELECT t FROM unnest($1::text[]) WITH ORDINALITY AS x(t, i) "
                "WHERE to_regclass(t) IS NOT NULL ORDER BY i",
                [*LEDGERS, USERS_TABLE],
            ),
            since_basis(),
        )
        ledgers = tuple(r["t"] for r in present if r["t"] in LEDGERS)
        splits = await same_hashes(sconn, tconn)
        users = any(r["t"] == USERS_TABLE for r in present)
        return cls(sconn, tconn, copied, ledgers, splits, since, basis, tallies or {}, users)

    async def find(
        self,
        name: str,
        source_name: str,
        source_key: str,
        target_key: str,
        dated: str | None,
        typed: tuple[str, str] | None = None,
    ) -> Found:
        """Target rows of ``name`` from production whose source key ``source_name`` lacks; kept in GONE.

        ``source_key`` and ``target_key`` are SQL text of a row's key (the target's over alias ``t``);
        ``dated`` the target column that dates a row from the copy; ``typed`` a one-column key as its
        column (over ``t``) and type, so a few keys are looked up through its index.
        """
        settled = await self._counted(name, source_name, source_key, target_key, typed, dated)
        if settled is not None:
            return settled
        pairs = _from_production(name, target_key, dated if self.copied else None, self.copied, self.ledgers)

        def source(params: Params) -> str:
            return f"SELECT {source_key} AS k FROM {table_ident(source_name)}"

        def target(params: Params) -> str:
            return f"SELECT o.s AS k FROM ({pairs(params)}) AS o"

        source_rows = await estimate_rows(self.sconn, source_name)
        buckets = bucket_count(source_rows) if self.splits else 1
        differing: list[Buckets] | None
        rows: int | None
        if await self._outgrown(name, source_rows, buckets):
            differing, rows = None, None
        else:
            differing, rows = await self._differing(source, target, buckets)
        if differing == []:
            return Found(0, [], source_rows=rows)
        await self.tconn.execute(
            f"DROP TABLE IF EXISTS pg_temp.{_SOURCE_KEYS}, pg_temp.{GONE}; "
            f"CREATE TEMP TABLE {_SOURCE_KEYS} (k text) ON COMMIT DROP"
        )
        read = await _stream(self.sconn, self.tconn, *_within(source, differing, Params()))
        rows = read if rows is None else rows
        await self.tconn.execute(f"ANALYZE {_SOURCE_KEYS}")
        params = Params()
        await self.tconn.execute(
            f"CREATE TEMP TABLE {GONE} ON COMMIT DROP AS SELECT DISTINCT o.k FROM ({pairs(params)}) AS o "
            f"WHERE {_in(differing, 'o.s', params)} "
            f"AND NOT EXISTS (SELECT FROM {_SOURCE_KEYS} AS x WHERE x.k = o.s)",
            *params.values,
        )
        first = await self.tconn.fetch(
            f"SELECT k, count(*) OVER () AS n FROM {GONE} ORDER BY k LIMIT {SHOWN}"
        )
        return Found(first[0]["n"] if first else 0, [r["k"] for r in first], read, rows)

    async def _outgrown(self, name: str, source_rows: float, buckets: int) -> bool:
        """Whether the source holds so many more rows than the whole target table that nearly every
        bucket is bound to differ (by both tables' statistics; never when the target's were never
        gathered): then every key is compared at once, without reading the sums first. A first run's
        production, grown since the copy, is such a source.

        Rows the source has beyond the target's land in buckets at random: with more than
        :data:`SURPLUS_PER_BUCKET` of them per bucket, over 95 % of the buckets hold one.
        """
        if self.copied is None or buckets < MOSTLY_OF:
            return False
        target_rows = await analyzed_rows(self.tconn, name)
        if target_rows is None:  # never analyzed: no figure to go by
            return False
        return source_rows - target_rows > SURPLUS_PER_BUCKET * buckets

    async def _counted(
        self,
        name: str,
        source_name: str,
        source_key: str,
        target_key: str,
        typed: tuple[str, str] | None,
        dated: str | None,
    ) -> Found | None:
        """No production delete, proved by counting (None: not provable).

        Of the rows the basis snapshot held, ``kept`` are still there unchanged; each of the others was
        deleted or changed since. A changed row whose key the target holds from production was there
        then (every such key was), so when as many changed rows are from production as rows are
        missing from ``kept``, none was deleted.
        """
        entry = self.basis.of(name, source_name) if self.basis is not None else None
        if entry is None or self.since is None:
            return None
        counts = self.tallies.get(name)
        if counts is None or counts.kept is None:
            params = Params()
            listed = changed_since(self.since, source_key, params)
            counts = tallied(await tally(self.sconn, source_name, {}, params, listed))
        missing = entry.missing(counts.kept)
        if missing > 0:
            if counts.changed is None or len(counts.changed) < missing:
                return None
            params = Params()
            probe = _held_from_production(name, target_key, typed, dated, self.copied, self.ledgers)
            existed = await self.tconn.fetchval(probe(params, counts.changed), *params.values)
            if existed < missing:
                return None
        return Found(0, [], source_rows=counts.rows, counted=True)

    async def _differing(
        self, source: KeySet, target: KeySet, buckets: int
    ) -> tuple[list[Buckets] | None, int]:
        """The buckets whose keys must be compared one by one (None: every key; empty: none), and the
        source's keys in all.

        A bucket differs when its count or key-hash sum does on the two sides and the target has keys in
        it. A differing bucket of more than :data:`SPLIT_AT` keys is summed again, split into buckets of
        about ``ROWS_PER_BUCKET`` keys, and only its differing parts are kept; when most of a spread's
        buckets differ, the whole spread is read (comparing its keys costs about what a finer sum would).
        """
        found: list[Buckets] = []
        within: Buckets | None = None
        rows: int | None = None
        while True:
            scope = [within] if within else None
            async with asyncio.TaskGroup() as sides:
                src = sides.create_task(bucket_sums(self.sconn, _relation(source, scope), buckets))
                tgt = sides.create_task(bucket_sums(self.tconn, _relation(target, scope), buckets))
            there, here = src.result(), tgt.result()
            if rows is None:
                rows = sum(n for n, _ in there.values())
            differ = sorted(b for b, sums in here.items() if there.get(b) != sums)
            if not differ:
                return found, rows
            if not self.splits or (len(here) >= MOSTLY_OF and 2 * len(differ) > len(here)):
                return ([*found, within] if within else None), rows
            sizes = {b: max(there.get(b, (0, ""))[0], here[b][0]) for b in differ}
            large = tuple(b for b in differ if sizes[b] > SPLIT_AT)
            fan = max(sizes.values()) // ROWS_PER_BUCKET
            if buckets * fan > FINEST:
                large = ()
            small = tuple(b for b in differ if b not in large)
            if small:
                found.append(Buckets(buckets, small))
            if not large:
                return found, rows
            within, buckets = Buckets(buckets, large), buckets * fan


def _from_production(
    name: str, target_key: str, dated: str | None, copied: datetime | None, ledgers: list[str]
) -> Callable[[Params], str]:
    """SQL of the target's rows from production: ``k`` a row's target key, ``s`` the source key it came from.

    A row's source keys are the ledgers' (each pair once), else, for a row dated before the copy, its
    own key. Written as one join per ledger (not a join with their union, which the planner misjudges).
    """

    def sql(params: Params) -> str:
        table = params.bind(name, "text") if ledgers else ""
        branches, earlier = [], []
        for ledger in ledgers:
            same = " AND ".join(
                f"NOT EXISTS (SELECT FROM {e} AS e WHERE e.table_name = {table} "
                f"AND e.source_key = l.source_key AND e.target_key = l.target_key)"
                for e in earlier
            )
            branches.append(
                f"SELECT {target_key} AS k, l.source_key AS s FROM {table_ident(name)} AS t "
                f"JOIN {ledger} AS l ON l.table_name = {table} AND l.target_key = {target_key}"
                + (f" WHERE {same}" if same else "")
            )
            earlier.append(ledger)
        if dated and copied:
            unledgered = _unledgered(ledgers, table, target_key)
            branches.append(
                f"SELECT {target_key} AS k, {target_key} AS s FROM {table_ident(name)} AS t "
                f"WHERE t.{ident(dated)} < {params.bind(copied, 'timestamptz')}{unledgered}"
            )
        return " UNION ALL ".join(branches) or "SELECT NULL::text AS k, NULL::text AS s WHERE false"

    return sql


def _held_from_production(
    name: str,
    target_key: str,
    typed: tuple[str, str] | None,
    dated: str | None,
    copied: datetime | None,
    ledgers: tuple[str, ...],
) -> Callable[[Params, list[str]], str]:
    """SQL counting the given source keys that a target row from production (as
    :func:`_from_production` tells them) holds, each looked up on its own (by index where ``typed``)."""

    def holds(key_text: str) -> str:
        if typed is None:
            return f"{target_key} = {key_text}"
        column, of_type = typed
        return f"{column} = ({key_text})::{of_type}"

    def sql(params: Params, keys: list[str]) -> str:
        table = params.bind(name, "text")
        held = [
            f"EXISTS (SELECT FROM {ledger} AS l JOIN {table_ident(name)} AS t ON {holds('l.target_key')} "
            f"WHERE l.table_name = {table} AND l.source_key = c.s)"
            for ledger in ledgers
        ]
        if dated and copied:
            unledgered = _unledgered(ledgers, table, "c.s")
            held.append(
                f"EXISTS (SELECT FROM {table_ident(name)} AS t WHERE {holds('c.s')} "
                f"AND t.{ident(dated)} < {params.bind(copied, 'timestamptz')}{unledgered})"
            )
        among = params.bind(keys, "text[]")
        return f"SELECT count(*) FROM unnest({among}) AS c(s) WHERE {' OR '.join(held) or 'false'}"

    return sql


def _unledgered(ledgers: Sequence[str], table: str, key: str) -> str:
    """SQL (each part after ``AND``) true when no entry of ``ledgers`` for ``table`` has ``key`` as its
    target key. ``_sync.landed`` is asked twice: for an entry that kept its key, through its primary key;
    for one whose key changed, through the index of those alone (it has no index of every target key)."""
    landed = (
        f"e.source_key = {key} AND e.target_key = {key}",
        f"e.target_key = {key} AND e.target_key <> e.source_key",
    )
    return "".join(
        f" AND NOT EXISTS (SELECT FROM {e} AS e WHERE e.table_name = {table} AND {found})"
        for e in ledgers
        for found in (landed if e == LANDED else (f"e.target_key = {key}",))
    )


def _relation(keys: KeySet, scope: list[Buckets] | None) -> Relation:
    """A key set as a relation of keys alone, kept to the buckets of ``scope`` (None: all)."""
    params = Params()
    from_sql = f"({keys(params)}) AS x"
    return Relation(from_sql, "x.k", [], _in(scope, "x.k", params), params)


def _in(scope: list[Buckets] | None, key: str, params: Params) -> str:
    """SQL true when ``key`` lies in one of the buckets of ``scope`` (None: every key)."""
    if scope is None:
        return "true"
    return "(" + " OR ".join(b.sql(key, params) for b in scope) + ")"


def _within(keys: KeySet, scope: list[Buckets] | None, params: Params) -> tuple[str, list]:
    """The statement reading the keys of ``scope`` and its arguments."""
    sql = f"SELECT x.k FROM ({keys(params)}) AS x WHERE {_in(scope, 'x.k', params)}"
    return sql, params.values


async def _stream(sconn: asyncpg.Connection, tconn: asyncpg.Connection, query: str, args: list) -> int:
    """The source's keys (``query`` with ``args``, one text column) into the target's key table, binary;
    how many."""
    return await pipe_copy(sconn, query, args, tconn, _SOURCE_KEYS)
