"""What the target's ``_sync`` schema says: runs, per-table progress, quarantined rows."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sync.connect import Endpoint, connect
from sync.models import Model
from sync.state import LOCK_KEY

PROCESS_GONE = "process gone"


class RunRow(Model):
    """One run as recorded."""

    id: int
    status: str
    started_at: datetime
    finished_at: datetime | None
    since: datetime | None
    high_water: datetime | None
    counts: dict[str, Any]
    reason: str | None = None
    """Why a failed or interrupted run stopped, in one line."""

    @property
    def shown_status(self) -> str:
        """The status as ``sync status`` prints it."""
        if self.status == "interrupted" and self.reason == PROCESS_GONE:
            return f"interrupted ({PROCESS_GONE})"
        return self.status


class TableProgress(Model):
    """A table's checkpoint in a run."""

    table: str
    rows_done: int
    done: bool
    updated_at: datetime


class QuarantinedRow(Model):
    """A row the target refused, with the database's message."""

    table: str
    source_key: str
    error: str
    sqlstate: str | None
    run_id: int | None
    created_at: datetime
    row: dict[str, Any] | None = None


class StatusReport(Model):
    """``sync status --json``."""

    initialised: bool
    runs: list[RunRow] = []
    progress: list[TableProgress] = []
    quarantined: int = 0
    quarantine: list[QuarantinedRow] = []


def _run_row(row: Any, locked: bool) -> RunRow:
    counts = json.loads(row["counts"])
    run = RunRow(**{**dict(row), "counts": counts, "reason": counts.get("error")})
    if run.status == "running" and not locked:
        return run.model_copy(update={"status": "interrupted", "reason": PROCESS_GONE})
    return run


async def read_status(target: Endpoint, *, runs: int = 10, show_quarantine: bool = False) -> StatusReport:
    """Read the state of ``target``; never writes (a target never synced says so)."""
    conn = await connect(target, application_name="sync status")
    try:
        if not await conn.fetchval("SELECT to_regclass('_sync.runs') IS NOT NULL"):
            return StatusReport(initialised=False)
        run_rows = await conn.fetch(
            "SELECT id, status, started_at, finished_at, since, high_water, counts FROM _sync.runs "
            "ORDER BY id DESC LIMIT $1",
            runs,
        )
        # A run still marked running while nobody holds the run lock was killed before it could say so.
        locked = await conn.fetchval(
            "SELECT EXISTS (SELECT FROM pg_locks WHERE locktype = 'advisory' AND objid = $1 AND granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))",
            LOCK_KEY,
        )
        report = StatusReport(initialised=True, runs=[_run_row(r, locked) for r in run_rows])
        if run_rows:
            progress = await conn.fetch(
                "SELECT table_name, rows_done, done, updated_at FROM _sync.checkpoints WHERE run_id = $1 "
                "ORDER BY updated_at",
                run_rows[0]["id"],
            )
            report.progress = [
                TableProgress(
                    table=p["table_name"],
                    rows_done=p["rows_done"],
                    done=p["done"],
                    updated_at=p["updated_at"],
                )
                for p in progress
            ]
        report.quarantined = await conn.fetchval(
            "SELECT count(*) FROM _sync.quarantine WHERE resolved_at IS NULL"
        )
        if show_quarantine:
            rows = await conn.fetch(
                "SELECT table_name, source_key, error, sqlstate, run_id, created_at, row_data "
                "FROM _sync.quarantine WHERE resolved_at IS NULL ORDER BY table_name, created_at"
            )
            report.quarantine = [
                QuarantinedRow(
                    table=r["table_name"],
                    source_key=r["source_key"],
                    error=r["error"],
                    sqlstate=r["sqlstate"],
                    run_id=r["run_id"],
                    created_at=r["created_at"],
                    row=json.loads(r["row_data"]),
                )
                for r in rows
            ]
        return report
    finally:
        await conn.close()
