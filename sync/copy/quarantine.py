"""Rows the target refuses: told apart from a broken run, isolated by halving, kept with the message.

A batch the target rejects for data reasons (a constraint, a cast, a trigger) is split in halves until
each refusal is one row; that row goes to ``_sync.quarantine`` with the database's message and
SQLSTATE, and the rest lands. A row that lands later (``sync quarantine retry``, or a later run after
the cause was fixed) leaves quarantine in the same transaction.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import asyncpg

from sync.copy.stage import STAGE
from sync.errors import first_line
from sync.sqltext import Pending

# SQLSTATE classes that mean "this row is wrong for the target", not "the run is broken".
DATA_ERROR_CLASSES = ("21", "22", "23", "2F", "39", "P0")


class RowRejected(Exception):
    """A data error that concerns rows, not the run: the batch is split to find the rows."""

    def __init__(self, message: str, sqlstate: str | None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def is_data_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the target refusing row data (constraint, cast, trigger), not a failure."""
    if isinstance(exc, RowRejected):
        return True
    state = getattr(exc, "sqlstate", None) or ""
    return isinstance(exc, asyncpg.PostgresError) and state[:2] in DATA_ERROR_CLASSES


async def isolate_refused(
    records: list[asyncpg.Record],
    land: Callable[[list[asyncpg.Record]], Awaitable[None]],
    refuse: Callable[[asyncpg.Record, BaseException], Awaitable[None]],
) -> None:
    """``land`` what the target accepts, halving the rows until each refusal is one row for ``refuse``."""
    if not records:
        return
    try:
        await land(records)
    except Exception as exc:
        if not is_data_error(exc):
            raise
        if len(records) == 1:
            await refuse(records[0], exc)
            return
        middle = len(records) // 2
        await isolate_refused(records[:middle], land, refuse)
        await isolate_refused(records[middle:], land, refuse)


async def quarantine_row(
    conn: asyncpg.Connection, run_id: int, table: str, record: asyncpg.Record, exc: BaseException
) -> None:
    """Keep a refused source row with the database's message (replacing an unresolved earlier entry)."""
    row = {k: v for k, v in dict(record).items() if not k.startswith("_")}
    await conn.execute(
        "INSERT INTO _sync.quarantine (run_id, table_name, source_key, row_data, error, sqlstate) "
        "VALUES ($1, $2, $3, $4::jsonb, $5, $6) "
        "ON CONFLICT (table_name, source_key) WHERE resolved_at IS NULL DO UPDATE SET "
        "run_id = EXCLUDED.run_id, row_data = EXCLUDED.row_data, error = EXCLUDED.error, "
        "sqlstate = EXCLUDED.sqlstate, created_at = now()",
        run_id,
        table,
        record["_source_key"],
        json.dumps(row, default=str),
        first_line(exc),
        getattr(exc, "sqlstate", None),
    )


async def resolve_landed(conn: asyncpg.Connection | Pending, table: str) -> None:
    """Mark the quarantined rows of ``table`` that are in the stage (and so land now) as resolved."""
    await conn.execute(
        f"UPDATE _sync.quarantine SET resolved_at = now() WHERE table_name = $1 AND resolved_at IS NULL "
        f"AND source_key IN (SELECT _source_key FROM {STAGE})",
        table,
    )
