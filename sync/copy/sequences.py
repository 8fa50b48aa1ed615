"""Sequences: moved forward past the keys a run copied, never backwards.

A ``remap`` table's key sequence first moves past every source key, so that a fresh key handed to a
colliding row is never a key the source uses too; after the tables, every sequence owned by a copied
column moves to at least the column's maximum.
"""

from __future__ import annotations

import asyncpg

from sync.plan import Plan, TablePlan
from sync.selection import source_key_columns
from sync.sqltext import ident, table_ident


async def advance_sequence(conn: asyncpg.Connection, sequence: str, value_sql: str, *args: object) -> None:
    """Move ``sequence`` (its name) forward to at least ``value_sql``; never backwards.

    ``value_sql`` is a scalar expression; its values are ``args``, bound from ``$2`` on.
    """
    await conn.execute(
        f"SELECT setval($1::regclass, v) FROM (SELECT ({value_sql})::bigint AS v) AS x "
        f"WHERE v IS NOT NULL AND v > coalesce(pg_sequence_last_value($1::regclass), 0)",
        sequence,
        *args,
    )


async def advance_past_source(sconn: asyncpg.Connection, tconn: asyncpg.Connection, tp: TablePlan) -> None:
    """Move a single-column key's sequence past both the source's and the target's highest key."""
    key = tp.primary_key[0]
    sequence = tp.sequences.get(key)
    if sequence is None:
        return
    source_max = await sconn.fetchval(
        f"SELECT max({ident(source_key_columns(tp)[0])})::text FROM {table_ident(tp.source_name)}"
    )
    if source_max is None:
        return
    await advance_sequence(
        tconn,
        sequence,
        f"GREATEST($2::text::bigint, (SELECT max({ident(key)}) FROM {table_ident(tp.name)}))",
        source_max,
    )


async def move_sequences(conn: asyncpg.Connection, plan: Plan) -> int:
    """Move every sequence owned by a copied column to at least max(column) in target; never back."""
    moved = 0
    for tp in plan.tables:
        copied = {c.target for c in tp.columns}
        for column, sequence in tp.sequences.items():
            if column in copied:
                await advance_sequence(
                    conn, sequence, f"SELECT max({ident(column)}) FROM {table_ident(tp.name)}"
                )
                moved += 1
    return moved
