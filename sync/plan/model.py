"""What a plan is: the tables a run copies, column by column, with their keys, window, parents and triggers.

Plain records: :mod:`sync.plan.build` draws them from the catalogs and the mapping; the auth import, the
copy and the verifier read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sync.catalog import Trigger
from sync.modes import AuthMode, ConflictPolicy, KeyStrategy, TriggerMode

AUTH_USERS = "auth.users"
INTEGER_TYPE_NAMES = {"smallint": 2**15 - 1, "integer": 2**31 - 1, "bigint": 2**63 - 1}
"""Integer key types as ``format_type`` names them, with their largest value."""


@dataclass(frozen=True)
class ColumnPlan:
    """A source column copied into a target column; ``cast`` is the target type when the types differ."""

    source: str
    target: str
    source_type: str
    target_type: str
    cast: str | None


@dataclass(frozen=True)
class ParentLink:
    """A foreign key of a copied table, in target names: ``columns`` of the child point at ``parent``."""

    columns: tuple[str, ...]
    parent: str
    parent_columns: tuple[str, ...]
    nullable: bool
    """Every column of the link accepts NULL, so a row can be inserted without it and patched later."""


@dataclass(frozen=True)
class TablePlan:
    """How one table is copied. Column names are the target's unless said otherwise."""

    name: str
    source_name: str
    key: KeyStrategy
    primary_key: tuple[str, ...]
    match_on: tuple[str, ...]
    natural: tuple[str, ...]
    since: str | None
    """The source column of the window; None reads the whole table."""
    since_indexed: bool
    policy: ConflictPolicy
    columns: list[ColumnPlan]
    """Copied columns: not the ignored ones, nor the target's generated or GENERATED ALWAYS non-key ones."""
    target_only: dict[str, str | None]
    """Target columns with no source: the mapping's SQL expression, or None for the column default / NULL."""
    parents: list[ParentLink]
    """Every foreign key of the table, including those to ``auth.users`` and to itself."""
    deferred: list[ParentLink]
    """Links that close a cycle: inserted NULL, then patched in a second pass."""
    triggers: list[Trigger]
    trigger_mode: TriggerMode
    sequences: dict[str, str]
    """Target column → its sequence (quoted SQL text), to move past the copied keys."""
    key_margin: int = 0
    """New keys for colliding rows start this far past the source's highest key (production's room)."""

    @property
    def patched_later(self) -> list[ParentLink]:
        """Links inserted as NULL and set by the second pass: cycle breakers, and nullable references
        to the table itself (a reply may come before its parent in key order, or in another batch)."""
        own = [link for link in self.parents if link.parent == self.name and link.nullable]
        return list(dict.fromkeys([*self.deferred, *own]))

    @property
    def row_key(self) -> tuple[str, ...]:
        """The columns that identify a row across both sides: the natural key, else the primary key.

        Rows are paged, matched, checkpointed and quarantined by it.
        """
        return self.natural if self.key == "natural" else self.primary_key

    @property
    def allocates_keys(self) -> bool:
        """Whether a colliding row gets a fresh key: a single copied integer key, remapped or natural."""
        if len(self.primary_key) != 1 or self.key not in ("remap", "natural"):
            return False
        return self.target_types.get(self.primary_key[0]) in INTEGER_TYPE_NAMES

    @property
    def staged_types(self) -> dict[str, str]:
        """Copied target column → the source's type (how the column is staged and read)."""
        return {c.target: c.source_type for c in self.columns}

    @property
    def target_types(self) -> dict[str, str]:
        """Copied target column → the target's type."""
        return {c.target: c.target_type for c in self.columns}


@dataclass
class Plan:
    """The whole plan: tables parents first, and what the user should know before a run."""

    tables: list[TablePlan]
    auth_mode: AuthMode
    notes: list[str] = field(default_factory=list)
    """Schema drift in plain English, and where new columns get their values."""
    warnings: list[str] = field(default_factory=list)
    auth_triggers: list[Trigger] = field(default_factory=list)
    """Triggers on the target's ``auth.users``: they fire for every user the auth import creates."""
