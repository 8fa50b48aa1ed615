"""The ledger of landed rows: which target row each production row became, whatever the key strategy.

Written in the batch's own transaction, after the upsert, so it never names a row that did not land.
A later run recognises a row by it before deciding anything from its columns: a production edit of a
``match_on`` column (a request moved to another user) updates the row it landed as, it never looks
like a collision and never makes a second copy. Production deletes are found through it too.
"""

from __future__ import annotations

import asyncpg

from sync.copy.stage import STAGE
from sync.plan import TablePlan
from sync.selection import target_key_sql
from sync.sqltext import Pending, ident

GROWTH = 0.1
"""A run that may have added more than this share of the entries the ledger's statistics describe (and
more than :data:`GROWN_BY` entries) analyses the ledger when it ends."""
GROWN_BY = 1_000


async def has_entries(conn: asyncpg.Connection, tp: TablePlan) -> bool:
    """Whether any row of the table has landed before (read when its copy begins)."""
    # Ordered by the primary key, so the planner walks it; a bare EXISTS was planned as a sequential
    # scan that stops at the first row of the table (behind every entry of the tables before it).
    query = "SELECT true FROM _sync.landed WHERE table_name = $1 ORDER BY source_key LIMIT 1"
    return bool(await conn.fetchval(query, tp.name))


async def recognise_landed(conn: asyncpg.Connection | Pending, tp: TablePlan) -> None:
    """Give staged rows that landed before the key they landed as (single-column keys), and mark them."""
    key = tp.primary_key[0]
    await conn.execute(
        f"UPDATE {STAGE} AS s SET {ident(key)} = l.target_key::{tp.staged_types[key]}, _mapped = true "
        f"FROM _sync.landed AS l WHERE l.table_name = $1 AND l.source_key = s._source_key",
        tp.name,
    )


async def record_landed(
    conn: asyncpg.Connection | Pending, tp: TablePlan, run_id: int, *, fresh: bool
) -> None:
    """Record every staged row (now on the target, under its staged key) in the ledger.

    ``fresh``: the ledger held no entry of the table when its copy began. A run copies each row once
    (its batches, passes and parts are disjoint, a retried batch rolled back, and only the run holding
    the run lock writes the ledger), so every staged row is new to it: a plain insert. Otherwise
    ``ON CONFLICT`` probes the ledger's key once per staged row (an entry whose target key changed is
    updated), whatever the planner thinks of the ledger; its statistics lag behind a run that writes
    it, and a join of the stage with the table's entries would read them all, once per batch.
    """
    upsert = (
        "ON CONFLICT (table_name, source_key) DO UPDATE "
        "SET target_key = EXCLUDED.target_key, run_id = EXCLUDED.run_id "
        "WHERE _sync.landed.target_key IS DISTINCT FROM EXCLUDED.target_key"
    )
    await conn.execute(
        f"INSERT INTO _sync.landed (table_name, source_key, target_key, run_id) "
        f"SELECT $1, s._source_key, {target_key_sql(tp, 's.')}, $2 FROM {STAGE} AS s ORDER BY 2 "
        f"{'' if fresh else upsert}",
        tp.name,
        run_id,
    )


async def refresh_statistics(conn: asyncpg.Connection, entries: int) -> bool:
    """``ANALYZE`` the ledger (and the id map) when a run that may have added ``entries`` grew it past what
    its statistics describe, as autovacuum would once it got to it; returns whether it did.

    A catch-up soon after a first run otherwise plans the ledger's per-key probes by statistics taken when
    it was nearly empty. PostgreSQL 15 then hashes every entry of a table for a few hundred keys: at scale
    100, one delete probe of the profiles took 1.2 s instead of 13 ms.
    """
    described = await conn.fetchval(
        "SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = '_sync.landed'::regclass"
    )
    if entries <= GROWN_BY + GROWTH * described:
        return False
    async with conn.transaction():
        await conn.execute("SET LOCAL lock_timeout = '2s'")  # behind autovacuum, which yields to it
        await conn.execute("ANALYZE _sync.landed, _sync.id_map")
    return True
