"""The plan read off both servers: each catalog on its own connection, at once, then the pure planner and
the target's cast check."""

from __future__ import annotations

from collections.abc import Awaitable

import asyncpg

from sync.catalog import read_catalog
from sync.connect import Endpoint, both, connect_both
from sync.errors import PlanError
from sync.mapping import Mapping
from sync.plan.build import build_plan
from sync.plan.casts import check_casts
from sync.plan.model import Plan


async def load_plan(source: Endpoint, target: Endpoint, mapping: Mapping) -> Plan:
    """Read both catalogs and build the plan; PlanError (nothing written) when it would lose data."""
    plan, sides = await open_plan(source, target, mapping)
    await both(sides[0].close(), sides[1].close())
    return plan


async def open_plan(
    source: Endpoint,
    target: Endpoint,
    mapping: Mapping,
    opened: Awaitable[tuple[asyncpg.Connection, asyncpg.Connection]] | None = None,
) -> tuple[Plan, tuple[asyncpg.Connection, asyncpg.Connection]]:
    """:func:`load_plan`'s plan, and the connections to (source, target) it was read on (``opened``, or
    new ones), left open for the preflight; closed when the plan fails."""
    sconn, tconn = await opened if opened is not None else await connect_both(source, target)
    schemas = mapping.sync.schemas
    try:
        # Each read in a read-only transaction of its own (read_catalog's).
        source_catalog, target_catalog = await both(
            read_catalog(sconn, schemas), read_catalog(tconn, schemas)
        )
        plan = build_plan(source_catalog, target_catalog, mapping)
        problems = await check_casts(tconn, plan.tables)
        if problems:
            raise PlanError(problems)
    except BaseException:
        await both(sconn.close(), tconn.close())
        raise
    return plan, (sconn, tconn)
