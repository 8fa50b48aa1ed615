"""What the plan notes and warns about beyond columns: check constraints and enum labels the target
added or lacks, triggers a run would fire, and row level security the logins do not bypass.

Nothing here is a problem: each line tells the user what a run will meet, so they can act before it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sync.catalog import Catalog, Table, Trigger
from sync.mapping import table_header
from sync.modes import TriggerMode


def check_notes(name: str, src: Table, tgt: Table) -> list[str]:
    """One note per check constraint the target has and the source lacks."""
    existing = set(src.checks.values())
    return [
        f"{name}: target adds {check} {definition}: source rows that break it will be refused"
        for check, definition in tgt.checks.items()
        if definition not in existing
    ]


def enum_drift(source: Catalog, target: Catalog) -> tuple[list[str], list[str]]:
    """Notes for enum labels only the target has, warnings for labels it lacks."""
    notes: list[str] = []
    warnings: list[str] = []
    for type_name in sorted(source.enums.keys() & target.enums.keys()):
        source_labels, target_labels = source.enums[type_name], target.enums[type_name]
        gained = [label for label in target_labels if label not in source_labels]
        lost = [label for label in source_labels if label not in target_labels]
        if gained:
            notes.append(f"enum {type_name} gained {_quoted(gained)} in target")
        if lost:
            warnings.append(
                f"enum {type_name} lacks {_quoted(lost)} in target: source rows using them will be refused"
            )
    return notes, warnings


def trigger_warnings(name: str, triggers: Sequence[Trigger], mode: TriggerMode) -> list[str]:
    """Enabled triggers that would call out for every copied row, or fire although told to skip."""
    warnings: list[str] = []
    for trigger in triggers:
        if not trigger.enabled:
            continue
        if trigger.reaches_outside and mode == TriggerMode.FIRE:
            warnings.append(
                f"{name}: trigger {trigger.name} ({trigger.function}) calls out of the database: every "
                f'copied row would fire it; add triggers = "skip" under {table_header(name)}'
            )
        elif mode == TriggerMode.SKIP and trigger.fires_on_replica:
            warnings.append(
                f"{name}: trigger {trigger.name} is ENABLE ALWAYS/REPLICA: "
                'it fires even with triggers = "skip"'
            )
    return warnings


def row_security_warnings(source: Catalog, target: Catalog, tables: Iterable[str]) -> list[str]:
    """A warning per side whose login does not bypass the row level security of copied ``tables``."""
    names = list(tables)
    warnings: list[str] = []
    for side, catalog, effect in (
        ("source", source, "rows their policies hide are not copied"),
        ("target", target, "their policies may refuse the copy's writes"),
    ):
        hidden = [n for n in names if catalog.tables[n].row_security]
        if catalog.bypass_rls or not hidden:
            continue
        warnings.append(
            f"the {side} login does not bypass row level security and {', '.join(hidden)} "
            f"enforce it: {effect}; connect as postgres (BYPASSRLS)"
        )
    return warnings


def _quoted(labels: Sequence[str]) -> str:
    return ", ".join(repr(label) for label in labels)
