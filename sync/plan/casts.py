"""Whether the target can store each changed column's source type: the plan's one question to a database."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from sync import sqltext
from sync.mapping import table_header, toml_string
from sync.plan.model import ColumnPlan, TablePlan


async def check_casts(conn: asyncpg.Connection, plans: Sequence[TablePlan]) -> list[str]:
    """Ask the target whether each column whose type changes can store the source type; return problems.

    The question is put to the target as the copy will put it: ``EXPLAIN INSERT INTO table (column)
    SELECT NULL::source_type``, so the target's own coercion rules for storing a value (assignment
    casts, I/O conversion to text types, array and domain rules) decide. EXPLAIN executes nothing, and
    each attempt runs in a savepoint of a read-only transaction that is rolled back.
    """
    casts = [(plan, column) for plan in plans for column in plan.columns if column.cast]
    problems: list[str] = []
    if not casts:
        return problems
    transaction = conn.transaction(readonly=True)
    await transaction.start()
    try:
        for plan, column in casts:
            problem = await _check_cast(conn, plan, column)
            if problem:
                problems.append(problem)
    finally:
        if not conn.is_closed():  # a lost connection has nothing to roll back: its failure is told
            await transaction.rollback()
    return problems


async def _check_cast(conn: asyncpg.Connection, plan: TablePlan, column: ColumnPlan) -> str | None:
    where = f"{plan.name}.{column.target}"
    fix = (
        f"add ignore = [{toml_string(column.source)}] under {table_header(plan.name)}, "
        "or change the column type"
    )
    # The source type resolved by the target itself; format_type gives it back as quoted SQL text.
    source_type = await conn.fetchval("SELECT format_type(to_regtype($1), NULL)", column.source_type)
    if source_type is None:
        return f"{where}: the source type {column.source_type} does not exist in target: {fix}"
    # A type cannot be a bound parameter: the statement carries the server's own spelling of it.
    statement = (
        f"EXPLAIN INSERT INTO {sqltext.table_ident(plan.name)} "
        f"({sqltext.ident(column.target)}) SELECT NULL::{source_type}"
    )
    try:
        async with conn.transaction():
            await conn.execute(statement)
    except asyncpg.InsufficientPrivilegeError as exc:
        return f"{plan.name}: cannot insert into the target table ({exc}): grant INSERT to the target login"
    except asyncpg.PostgresError as exc:
        return (
            f"{where}: {column.source_type} in source cannot be stored as {column.target_type} "
            f"in target ({exc}): {fix}"
        )
    return None
