"""Sequences: moved forward past the keys a run copied, never backwards.

A table that gives colliding rows fresh keys first moves its key sequence past every source key plus a
margin, so that a fresh key is never a key the source uses, nor one it will issue soon; after the
tables, every sequence owned by a copied column moves to at least the column's maximum.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from sync.plan import Plan, TablePlan
from sync.plan.model import INTEGER_TYPE_NAMES
from sync.selection import source_columns
from sync.sqltext import ident, table_ident


async def advance_sequences(
    conn: asyncpg.Connection, values: Sequence[tuple[str, str]], *args: object
) -> None:
    """Move each ``(sequence, value_sql)``'s sequence (its name) forward to at least its value; never
    backwards. One statement for all of them (each a round trip of its own on a remote server).

    Each ``value_sql`` is a scalar expression; its values are ``args``, bound from ``$1`` on (the
    sequences' names are bound after them).
    """
    if not values:
        return
    rows = ", ".join(
        f"(${number}::text, ({value_sql})::bigint)"
        for number, (_, value_sql) in enumerate(values, start=len(args) + 1)
    )
    await conn.execute(
        f"SELECT setval(s.name::regclass, s.v) FROM (VALUES {rows}) AS s(name, v) "
        f"WHERE s.v IS NOT NULL AND s.v > coalesce(pg_sequence_last_value(s.name::regclass), 0)",
        *args,
        *(sequence for sequence, _ in values),
    )


async def advance_past_source(sconn: asyncpg.Connection, tconn: asyncpg.Connection, tp: TablePlan) -> int:
    """Where fresh keys for the table's colliding rows start; its sequence moves there (never back).

    That is the source's highest key plus the plan's margin (capped at the key type's largest value):
    production keeps issuing keys just past its highest, so a key taken closer would collide again
    with production's next rows at every catch-up.
    """
    key = tp.primary_key[0]
    source_max = await sconn.fetchval(
        f"SELECT coalesce(max({ident(source_columns(tp, [key])[0])}), 0)::bigint "
        f"FROM {table_ident(tp.source_name)}"
    )
    largest = INTEGER_TYPE_NAMES.get(tp.target_types[key], 2**63 - 1)
    floor = min(int(source_max) + tp.key_margin, largest - 1)
    sequence = tp.sequences.get(key)
    if sequence is not None:
        await advance_sequences(
            tconn,
            [(sequence, f"GREATEST($1::bigint, (SELECT max({ident(key)}) FROM {table_ident(tp.name)}))")],
            floor,
        )
    return floor


def sequences_set(plan: Plan) -> list[tuple[TablePlan, str, str]]:
    """Every ``(table, column, sequence)`` whose sequence a run moves: those owned by a copied column.

    They include the key sequences of tables that allocate fresh keys. The preflight checks the
    privileges on exactly these.
    """
    return [
        (tp, column, sequence)
        for tp in plan.tables
        for column, sequence in tp.sequences.items()
        if column in {c.target for c in tp.columns}
    ]


async def move_sequences(conn: asyncpg.Connection, plan: Plan) -> int:
    """Move every sequence owned by a copied column to at least max(column) in target; never back."""
    moved = sequences_set(plan)
    await advance_sequences(
        conn,
        [
            (sequence, f"SELECT max({ident(column)}) FROM {table_ident(tp.name)}")
            for tp, column, sequence in moved
        ],
    )
    return len(moved)
