"""The names of the tool's modes and policies, written once: the mapping file, the plan, the auth import
and the copy all speak these.

Each is a ``StrEnum``: a member equals its text (``KeyStrategy.REMAP == "remap"``), prints as it, and
pydantic accepts either when it validates a model.
"""

from __future__ import annotations

from enum import StrEnum


class KeyStrategy(StrEnum):
    """How a table's rows keep their identity in target."""

    PRESERVE = "preserve"
    """Source keys are the target's keys."""
    REMAP = "remap"
    """Colliding source keys get fresh target keys, remembered in the id map."""
    NATURAL = "natural"
    """Rows are matched on unique columns named in the mapping, not on a primary key."""


class ConflictPolicy(StrEnum):
    """What happens to a row (or user) both databases have."""

    SOURCE_WINS = "source-wins"
    TARGET_WINS = "target-wins"
    NEWEST_WINS = "newest-wins"
    """The row with the later ``updated_at`` is kept (tables only)."""


class AuthMode(StrEnum):
    """How users reach the target: written into the auth schema, or created through the admin API."""

    DIRECT = "direct"
    ADMIN_API = "admin-api"


class TriggerMode(StrEnum):
    """Whether the target's triggers fire for the rows and users a run writes."""

    FIRE = "fire"
    SKIP = "skip"


class DeleteMode(StrEnum):
    """What a run does with production deletes (rows and users production no longer has)."""

    REPORT = "report"
    """Count and name them; change nothing."""
    APPLY = "apply"
    """Delete them on the target (users with their identities)."""
    SOFT = "soft"
    """As apply, but users are marked deleted and banned, as the Auth server's soft delete does."""
