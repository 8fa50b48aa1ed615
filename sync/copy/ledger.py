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
from sync.sqltext import ident


async def recognise_landed(conn: asyncpg.Connection, tp: TablePlan) -> None:
    """Give staged rows that landed before the key they landed as (single-column keys), and mark them."""
    key = tp.primary_key[0]
    await conn.execute(
        f"UPDATE {STAGE} AS s SET {ident(key)} = l.target_key::{tp.staged_types[key]}, _mapped = true "
        f"FROM _sync.landed AS l WHERE l.table_name = $1 AND l.source_key = s._source_key",
        tp.name,
    )


async def record_landed(conn: asyncpg.Connection, tp: TablePlan, run_id: int) -> None:
    """Record every staged row (now on the target, under its staged key) in the ledger.

    An entry whose target key changed is updated, a new one inserted, in one statement (both parts see
    the ledger as it was before it). Only a run holding the run lock writes the ledger, and the parts
    of a table copied at once stage disjoint keys, so no other transaction inserts the same entries:
    a plain insert of the missing ones costs less than ``ON CONFLICT``'s speculative insertion.
    """
    key = target_key_sql(tp, "s.")
    same = "l.table_name = $1 AND l.source_key = s._source_key"
    await conn.execute(
        f"WITH moved AS (UPDATE _sync.landed AS l SET target_key = {key}, run_id = $2 FROM {STAGE} AS s "
        f"  WHERE {same} AND l.target_key IS DISTINCT FROM {key}) "
        f"INSERT INTO _sync.landed (table_name, source_key, target_key, run_id) "
        f"SELECT $1, s._source_key, {key}, $2 FROM {STAGE} AS s "
        f"WHERE NOT EXISTS (SELECT FROM _sync.landed AS l WHERE {same})",
        tp.name,
        run_id,
    )
