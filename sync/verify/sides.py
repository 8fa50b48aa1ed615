"""``sync verify`` between two endpoints: reach both, plan, the read-only preflight, then the comparison.

The one sequence ``sync verify`` and ``sync cutover`` both run, so they refuse and compare alike.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from sync.connect import Endpoint, both
from sync.mapping import Mapping
from sync.plan.load import open_plan
from sync.preflight import Needs, preflight, reach
from sync.storage.rules import storage_rules
from sync.verify import VerifyReport, verify

Named = Callable[[str, str], None]
"""Told both sides' descriptions (``user@host:port/db (PostgreSQL 18.1, direct)``) once they are known."""


async def verify_sides(
    source: Endpoint,
    target: Endpoint,
    mapping: Mapping,
    since: datetime | None,
    *,
    named: Named | None = None,
) -> VerifyReport:
    """Compare the target with production as ``sync verify`` does; UsageError (exit 2) when refused."""
    source, target = await reach(source, target)
    plan, sides = await open_plan(source, target, mapping)
    try:
        checked = await preflight(source, target, plan, Needs(writes=False), on=sides)
    finally:
        await both(sides[0].close(), sides[1].close())
    if named is not None:
        named(checked.source.describe(source), checked.target.describe(target))
    return await verify(source, target, plan, since, storage=storage_rules(plan, mapping))
