"""What ``sync plan --json`` prints: the plan's tables, triggers and user counts as pydantic models."""

from __future__ import annotations

from datetime import datetime

from pydantic import ConfigDict

from sync.catalog import Trigger
from sync.models import Model
from sync.modes import AuthMode, ConflictPolicy, KeyStrategy, TriggerMode
from sync.plan.model import ParentLink, TablePlan


class TriggerReport(Model):
    """A trigger as ``sync plan --json`` shows it."""

    model_config = ConfigDict(extra="forbid")

    name: str
    table: str
    function: str
    timing: str
    enabled: bool
    fires_on_replica: bool
    reaches_outside: bool

    @classmethod
    def of(cls, trigger: Trigger) -> TriggerReport:
        return cls(
            name=trigger.name,
            table=trigger.table,
            function=trigger.function,
            timing=trigger.timing,
            enabled=trigger.enabled,
            fires_on_replica=trigger.fires_on_replica,
            reaches_outside=trigger.reaches_outside,
        )


class TableReport(Model):
    """One table of the plan, with what the source holds in the window."""

    model_config = ConfigDict(extra="forbid")

    name: str
    source_name: str
    key: KeyStrategy
    primary_key: list[str]
    match_on: list[str]
    natural: list[str]
    since: str | None
    since_indexed: bool
    policy: ConflictPolicy
    columns: list[str]
    casts: dict[str, str]
    new_columns: dict[str, str | None]
    parents: list[str]
    deferred: list[str]
    trigger_mode: TriggerMode
    triggers: list[TriggerReport]
    window_rows: int | None = None
    """Source rows in the window (None when not counted)."""
    parent_rows: int | None = None
    """Source rows outside the window that the window's rows need (the closure): a run reads both."""
    collisions: int | None = None
    """Remap tables: source keys in the window that the target uses for a different row."""

    @classmethod
    def of(cls, plan: TablePlan) -> TableReport:
        return cls(
            name=plan.name,
            source_name=plan.source_name,
            key=plan.key,
            primary_key=list(plan.primary_key),
            match_on=list(plan.match_on),
            natural=list(plan.natural),
            since=plan.since,
            since_indexed=plan.since_indexed,
            policy=plan.policy,
            columns=[c.target for c in plan.columns],
            casts={c.target: c.cast for c in plan.columns if c.cast},
            new_columns=dict(plan.target_only),
            parents=[_link_text(link) for link in plan.parents],
            deferred=[_link_text(link) for link in plan.deferred],
            trigger_mode=plan.trigger_mode,
            triggers=[TriggerReport.of(t) for t in plan.triggers],
        )


def _link_text(link: ParentLink) -> str:
    return f"({', '.join(link.columns)}) → {link.parent} ({', '.join(link.parent_columns)})"


class UserReport(Model):
    """How the source's users meet the target's: each source user is counted once, in this order."""

    model_config = ConfigDict(extra="forbid")

    source: int
    target: int
    matched_by_id: int
    matched_by_email: int
    matched_by_phone: int
    to_create: int
    set_aside: int = 0
    """Users the run would quarantine (two source users on one target user, a taken contact)."""


class PlanReport(Model):
    """What ``sync plan --json`` prints: the plan, the counts behind it, and what stands in its way."""

    model_config = ConfigDict(extra="forbid")

    source: str
    target: str
    source_version: int
    target_version: int
    source_pool: str = "direct"
    """How the source is reached: ``direct``, ``session`` or ``transaction`` pooling."""
    target_pool: str = "direct"
    mapping: str
    since: datetime | None
    """Rows whose since-column is at or after this instant are in the window; None: whole tables."""
    catch_up: bool = False
    """No ``--since`` was given: ``since`` is where ``sync run`` would start (the last run's mark)."""
    auth_mode: AuthMode
    tables: list[TableReport]
    users: UserReport | None = None
    auth_triggers: list[TriggerReport]
    notes: list[str]
    warnings: list[str]
    errors: list[str]
    files: list[str] = []
    """Storage objects per bucket: how many (and how many bytes) a run would copy, and bucket drift."""
    deletes: list[str] = []
    """Production deletes per table (and users): rows the target has from production that production lost."""
