"""The tool's state in the target (schema ``_sync``): runs, checkpoints, the id map, quarantine."""

from __future__ import annotations

import asyncpg

from sync.resources import sql_dir

STATE_VERSION = 1


async def ensure_state(conn: asyncpg.Connection) -> None:
    """Create the ``_sync`` schema on first use (idempotent; safe under concurrent callers)."""
    version = await conn.fetchval(
        "SELECT CASE WHEN to_regclass('_sync.schema_version') IS NULL THEN NULL "
        "ELSE (SELECT max(version) FROM _sync.schema_version) END"
    )
    if version == STATE_VERSION:
        return
    async with conn.transaction():
        # Serialise creators: CREATE ... IF NOT EXISTS still races on the catalog.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('_sync.schema'))")
        await conn.execute((sql_dir() / "state.sql").read_text())
