"""The plan: which tables a run copies, in which order, column by column — or every reason it would lose data.

:func:`build_plan` compares the source and target catalogs through the mapping and is pure: no I/O, the
same catalogs and mapping give the same plan. Everything that could lose data is a problem, and all
problems are reported together in one :class:`~sync.errors.PlanError`, each naming ``table.column`` and
the mapping line that would fix it. Only the cast check needs the target itself (:func:`check_casts`):
whether a type can be stored in another is the target's rule, not a table kept here.

Defaults for a table without a mapping entry:

- key: a single uuid primary key is ``preserve``; a single integer key is ``remap``; anything else is
  ``preserve``. A table without primary key needs ``key = "natural"``.
- match_on (``remap``): ``created_at`` when copied, plus the columns of foreign keys that point at a
  user — at ``auth.users`` or at a table whose primary key is itself a foreign key to ``auth.users``
  (the ``profiles`` pattern). Two rows with the same key are the same row when these agree.
- since: ``updated_at`` when the source has it, else ``created_at``, else the whole table.
- policy: ``source-wins``; triggers: the ``[sync]`` setting (``fire`` unless changed).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Literal

import asyncpg
from pydantic import BaseModel, ConfigDict

from sync import sqltext
from sync.catalog import Catalog, Column, Table, Trigger
from sync.errors import PlanError
from sync.mapping import KeyStrategy, Mapping, TableRule, table_header, toml_key, toml_string

INTEGER_TYPES = ("int2", "int4", "int8")
WINDOW_TYPES = ("timestamptz", "timestamp", "date")
AUTH_USERS = "auth.users"


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
    policy: str
    columns: list[ColumnPlan]
    """Copied columns: not the ignored ones, nor the target's generated or GENERATED ALWAYS non-key ones."""
    target_only: dict[str, str | None]
    """Target columns with no source: the mapping's SQL expression, or None for the column default / NULL."""
    parents: list[ParentLink]
    """Every foreign key of the table, including those to ``auth.users`` and to itself."""
    deferred: list[ParentLink]
    """Links that close a cycle: inserted NULL, then patched in a second pass."""
    triggers: list[Trigger]
    trigger_mode: Literal["fire", "skip"]
    sequences: dict[str, str]
    """Target column → its sequence (quoted SQL text), to move past the copied keys."""

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
    auth_mode: str
    notes: list[str] = field(default_factory=list)
    """Schema drift in plain English, and where new columns get their values."""
    warnings: list[str] = field(default_factory=list)
    auth_triggers: list[Trigger] = field(default_factory=list)
    """Triggers on the target's ``auth.users``: they fire for every user the auth import creates."""


def build_plan(source: Catalog, target: Catalog, mapping: Mapping) -> Plan:
    """Plan the copy of ``source`` into ``target`` under ``mapping``; PlanError lists every problem."""
    plan, problems = draft_plan(source, target, mapping)
    if problems:
        raise PlanError(problems)
    return plan


def draft_plan(source: Catalog, target: Catalog, mapping: Mapping) -> tuple[Plan, list[str]]:
    """The plan as far as it can be drawn, and every problem found (empty when it is safe to run)."""
    planner = _Planner(source, target, mapping)
    return planner.plan(), planner.problems


class _Planner:
    """Collects notes, warnings and problems while drawing a plan."""

    def __init__(self, source: Catalog, target: Catalog, mapping: Mapping) -> None:
        self.source = source
        self.target = target
        self.mapping = mapping
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.warnings: list[str] = []
        schemas = set(mapping.sync.schemas)
        self.source_tables = {n: t for n, t in source.tables.items() if t.schema in schemas}
        self.target_tables = {n: t for n, t in target.tables.items() if t.schema in schemas}
        self.owners = _user_tables(target)

    def plan(self) -> Plan:
        self._check_table_names()
        excluded = set(self.mapping.sync.exclude)
        plans: dict[str, TablePlan] = {}
        for name in sorted(self.source_tables.keys() | self.target_tables.keys()):
            rule = self.mapping.rule(name)
            if name in excluded or rule.skip:
                self.notes.append(f"{name} is excluded by the mapping: left alone")
            elif name not in self.source_tables:
                self.notes.append(f"{name} exists only in target: left alone")
            elif name not in self.target_tables:
                self.problems.append(
                    f"{name} exists only in source: add exclude = [{toml_string(name)}] under [sync], "
                    f"or skip = true under {table_header(name)}"
                )
            else:
                table_plan = self._table(name, rule, self.source_tables[name], self.target_tables[name])
                if table_plan is not None:
                    plans[name] = table_plan
        self._drift_in_enums()
        self._row_security(plans)
        auth_users = self.target.tables.get(AUTH_USERS)
        return Plan(
            tables=self._order(plans),
            auth_mode=self.mapping.sync.auth,
            notes=self.notes,
            warnings=self.warnings,
            auth_triggers=list(auth_users.triggers) if auth_users else [],
        )

    # ------------------------------------------------------------------------------------ tables

    def _check_table_names(self) -> None:
        known = self.source_tables.keys() | self.target_tables.keys()
        schemas = ", ".join(self.mapping.sync.schemas)
        for name in self.mapping.tables:
            if name not in known:
                self.problems.append(
                    f"{self.mapping.origin}: {table_header(name)} names a table that neither database has "
                    f"in the synced schemas ({schemas}): fix the name or remove the entry"
                )
        for name in self.mapping.sync.exclude:
            if name not in known:
                self.problems.append(
                    f"{self.mapping.origin}: exclude names {name}, which neither database has in the "
                    f"synced schemas ({schemas}): fix the name or remove it from exclude under [sync]"
                )

    def _table(self, name: str, rule: TableRule, src: Table, tgt: Table) -> TablePlan | None:
        """The table's plan; kept despite problems when it has a key, so its casts get checked too."""
        self._check_rule_columns(name, rule, src, tgt)
        columns = self._columns(name, rule, src, tgt)
        copied = {c.target for c in columns}
        target_only = self._target_only(name, rule, src, tgt, copied)
        key, match_on, natural = self._key(name, rule, tgt, copied)
        since = self._since(name, rule, src)
        policy = rule.policy or "source-wins"
        if policy == "newest-wins" and "updated_at" not in copied:
            self.problems.append(
                f'{name}: policy = "newest-wins" compares updated_at, which is not copied: '
                f"choose another policy under {table_header(name)}"
            )
        self._checks_drift(name, src, tgt)
        trigger_mode = rule.triggers or self.mapping.sync.triggers
        self._trigger_warnings(name, tgt.triggers, trigger_mode)
        if since is not None and since not in src.indexed:
            self.warnings.append(
                f"{name}: since-column {since} has no index in source, so every run scans the whole table "
                f"(CREATE INDEX ON {sqltext.ident(src.schema)}.{sqltext.ident(src.table)} "
                f"({sqltext.ident(since)}))"
            )
        if key is None:
            return None
        return TablePlan(
            name=name,
            source_name=src.name,
            key=key,
            primary_key=tgt.primary_key,
            match_on=match_on,
            natural=natural,
            since=since,
            since_indexed=since is not None and since in src.indexed,
            policy=policy,
            columns=columns,
            target_only=target_only,
            parents=[
                ParentLink(
                    columns=fk.columns,
                    parent=fk.referenced,
                    parent_columns=fk.referenced_columns,
                    nullable=all(tgt.columns[c].nullable for c in fk.columns),
                )
                for fk in tgt.foreign_keys
            ],
            deferred=[],
            triggers=list(tgt.triggers),
            trigger_mode=trigger_mode,
            sequences=dict(tgt.sequences),
        )

    def _check_rule_columns(self, name: str, rule: TableRule, src: Table, tgt: Table) -> None:
        """Every column a mapping entry names must exist where the entry says it does."""
        header = table_header(name)
        for column in rule.ignore:
            if column not in src.columns:
                self.problems.append(
                    f"{name}.{column} is in ignore but not in the source table: "
                    f"remove it from ignore under {header}"
                )
        for old, new in rule.rename.items():
            if old not in src.columns:
                self.problems.append(
                    f"{name}.{old} is renamed but not in the source table: "
                    f"remove {toml_key(old)} from rename under {header}"
                )
            if new not in tgt.columns:
                self.problems.append(
                    f"{name}.{old} is renamed to {new}, which the target table does not have: "
                    f"fix rename = {{ {toml_key(old)} = {toml_string(new)} }} under {header}"
                )
        for column in rule.defaults:
            if column not in tgt.columns:
                self.problems.append(
                    f"{name}.{column} has a default in the mapping but is not in the target table: "
                    f"remove it from defaults under {header}"
                )
        for setting, columns in (("match_on", rule.match_on), ("natural", rule.natural)):
            for column in columns or ():
                if column not in tgt.columns:
                    self.problems.append(
                        f"{name}.{column} is in {setting} but not in the target table: "
                        f"fix {setting} under {header} (it names target columns)"
                    )

    def _columns(self, name: str, rule: TableRule, src: Table, tgt: Table) -> list[ColumnPlan]:
        header = table_header(name)
        ignored = set(rule.ignore)
        homeless = [c for c in src.columns if c not in ignored and rule.rename.get(c, c) not in tgt.columns]
        unclaimed = [
            c
            for c in tgt.columns.values()
            if c.name not in src.columns and c.name not in rule.rename.values() and not c.generated
        ]
        columns: list[ColumnPlan] = []
        for col in src.columns.values():
            if col.name in ignored:
                self.notes.append(f"{name}: column {col.name} is not copied (ignore)")
                continue
            if col.name in homeless:
                if col.name not in rule.rename:
                    self.problems.append(self._homeless(name, header, col, unclaimed, len(homeless)))
                continue
            tcol = tgt.columns[rule.rename.get(col.name, col.name)]
            if tcol.name != col.name:
                self.notes.append(f"{name}: column {col.name} renamed to {tcol.name}")
            twin = next((c.source for c in columns if c.target == tcol.name), None)
            if twin is not None:
                self.problems.append(
                    f"{name}.{tcol.name} would receive both {twin} and {col.name} from source: "
                    f"ignore or rename one of them under {header}"
                )
                continue
            if tcol.generated:
                self.notes.append(f"{name}: column {tcol.name} is generated in target: computed there")
                continue
            if tcol.identity == "a" and tcol.name not in tgt.primary_key:
                self.notes.append(f"{name}: column {tcol.name} is GENERATED ALWAYS in target: numbered there")
                continue
            if tcol.identity == "a":
                self.warnings.append(
                    f"{name}: key column {tcol.name} is GENERATED ALWAYS in target: copied keys can only be "
                    f"inserted with OVERRIDING SYSTEM VALUE"
                )
            cast = tcol.type if tcol.type != col.type else None
            if cast:
                self.notes.append(f"{name}: column {tcol.name} changes type from {col.type} to {tcol.type}")
            if col.nullable and not tcol.nullable:
                self.warnings.append(
                    f"{name}.{tcol.name} is NOT NULL in target but nullable in source: "
                    f"source rows with NULL there will be refused"
                )
            columns.append(ColumnPlan(col.name, tcol.name, col.type, tcol.type, cast))
        return columns

    @staticmethod
    def _homeless(name: str, header: str, col: Column, unclaimed: list[Column], homeless: int) -> str:
        # A new target column of the same type is likely the renamed one: name it when it is the only
        # candidate for the only homeless column, else list the candidates.
        candidates = [c.name for c in unclaimed if c.type == col.type]
        new = candidates[0] if len(candidates) == 1 and homeless == 1 else "..."
        hint = (
            f" (new target columns of type {col.type}: {', '.join(candidates)})"
            if new == "..." and candidates
            else ""
        )
        return (
            f"{name}.{col.name} exists only in source: add ignore = [{toml_string(col.name)}] "
            f"or rename = {{ {toml_key(col.name)} = {toml_string(new)} }} under {header}{hint}"
        )

    def _target_only(
        self, name: str, rule: TableRule, src: Table, tgt: Table, copied: set[str]
    ) -> dict[str, str | None]:
        """Target columns no source column fills, and where their values come from on insert."""
        counterparts = {rule.rename.get(c, c) for c in src.columns}
        target_only: dict[str, str | None] = {}
        for col in tgt.columns.values():
            if col.name in copied:
                if col.name in rule.defaults:
                    self.problems.append(
                        f"{name}.{col.name} is copied from source, so its mapping default is never used: "
                        f"remove it from defaults under {table_header(name)}"
                    )
                continue
            expression = rule.defaults.get(col.name)
            target_only[col.name] = expression
            if expression is not None:
                origin = f"the mapping's {expression}"
            elif col.generated:
                origin = "its generated expression"
            elif col.identity:
                origin = "the next identity value"
            elif col.default is not None:
                origin = f"its default {col.default}"
            elif col.nullable:
                origin = "NULL"
            else:
                self.problems.append(
                    f"{name}.{col.name} is NOT NULL in target with no default and no source column: "
                    f"add defaults = {{ {toml_key(col.name)} = {toml_string('<SQL expression>')} }} "
                    f"under {table_header(name)}"
                )
                continue
            if col.name not in counterparts:  # ignored and generated ones already have their note
                self.notes.append(f"{name}: new column {col.name}: inserted rows get {origin}")
        return target_only

    def _key(
        self, name: str, rule: TableRule, tgt: Table, copied: set[str]
    ) -> tuple[KeyStrategy | None, tuple[str, ...], tuple[str, ...]]:
        header = table_header(name)
        pk = tgt.primary_key
        key: KeyStrategy | None = rule.key
        if key is None and pk:
            key = "remap" if len(pk) == 1 and tgt.columns[pk[0]].type_name in INTEGER_TYPES else "preserve"
        elif key is None and rule.natural:
            key = "natural"
        if key is None:
            self.problems.append(
                f'{name} has no primary key in target and no natural key: add key = "natural" and '
                f'natural = ["..."] (columns with a unique constraint) under {header}, or skip = true'
            )
            return None, (), ()
        natural = tuple(rule.natural or ())
        if key == "natural":
            if not any(set(u) == set(natural) for u in [*tgt.unique, pk]):
                self.problems.append(
                    f"{name}: natural = [{', '.join(map(toml_string, natural))}] has no unique constraint "
                    f"or index in target, "
                    f"so it cannot identify a row: choose unique columns under {header}"
                )
            self._require_copied(name, "natural", natural, copied)
            return key, (), natural
        if not pk:
            self.problems.append(
                f'{name}: key = "{key}" needs a primary key, which the target table lacks: '
                f'use key = "natural" with natural = ["..."] under {header}'
            )
            return None, (), ()
        missing = [c for c in pk if c not in copied]
        if missing:
            self.problems.append(
                f"{name}: primary key column {', '.join(missing)} gets no value from source: "
                f'map it with rename, or use key = "natural" under {header}'
            )
        if key != "remap":
            if rule.match_on:
                self.warnings.append(f'{name}: match_on has no effect with key = "{key}" (only with "remap")')
            return key, (), natural
        match_on = tuple(rule.match_on or self._default_match_on(tgt, copied))
        if not match_on:
            self.problems.append(
                f"{name}: key {', '.join(pk)} is remapped but nothing tells two rows with the "
                f'same key apart: add match_on = ["..."] (columns that identify a row) under {header}, '
                f'or key = "preserve"'
            )
        self._require_copied(name, "match_on", match_on, copied)
        return key, match_on, natural

    def _default_match_on(self, tgt: Table, copied: set[str]) -> list[str]:
        columns = ["created_at"] if "created_at" in copied else []
        for fk in tgt.foreign_keys:
            if fk.referenced in self.owners and fk.columns != tgt.primary_key:
                columns += [c for c in fk.columns if c in copied and c not in columns]
        return columns

    def _require_copied(self, name: str, setting: str, columns: Iterable[str], copied: set[str]) -> None:
        for column in columns:
            if column not in copied and column in self.target_tables[name].columns:
                self.problems.append(
                    f"{name}.{column} is in {setting} but gets no value from source: "
                    f"choose copied columns under {table_header(name)}"
                )

    def _since(self, name: str, rule: TableRule, src: Table) -> str | None:
        if rule.since is False:
            return None
        if rule.since is None:
            return next((c for c in ("updated_at", "created_at") if c in src.columns), None)
        column = src.columns.get(rule.since)
        if column is None:
            self.problems.append(
                f"{name}.{rule.since} is the since-column but not in the source table: "
                f"fix since under {table_header(name)} (it names a source column)"
            )
            return None
        if column.type_name not in WINDOW_TYPES:
            self.problems.append(
                f"{name}.{rule.since} is the since-column but is {column.type}, not a date or timestamp: "
                f"fix since under {table_header(name)}, or since = false for the whole table"
            )
            return None
        return rule.since

    # ------------------------------------------------------------------------------------ drift

    def _checks_drift(self, name: str, src: Table, tgt: Table) -> None:
        existing = set(src.checks.values())
        for check, definition in tgt.checks.items():
            if definition not in existing:
                self.notes.append(
                    f"{name}: target adds {check} {definition}: source rows that break it will be refused"
                )

    def _drift_in_enums(self) -> None:
        for type_name in sorted(self.source.enums.keys() & self.target.enums.keys()):
            source_labels, target_labels = self.source.enums[type_name], self.target.enums[type_name]
            gained = [label for label in target_labels if label not in source_labels]
            lost = [label for label in source_labels if label not in target_labels]
            if gained:
                self.notes.append(f"enum {type_name} gained {_quoted(gained)} in target")
            if lost:
                self.warnings.append(
                    f"enum {type_name} lacks {_quoted(lost)} in target: "
                    "source rows using them will be refused"
                )

    def _trigger_warnings(self, name: str, triggers: Sequence[Trigger], mode: str) -> None:
        for trigger in triggers:
            if not trigger.enabled:
                continue
            if trigger.reaches_outside and mode == "fire":
                self.warnings.append(
                    f"{name}: trigger {trigger.name} ({trigger.function}) calls out of the database: every "
                    f'copied row would fire it; add triggers = "skip" under {table_header(name)}'
                )
            elif mode == "skip" and trigger.fires_on_replica:
                self.warnings.append(
                    f"{name}: trigger {trigger.name} is ENABLE ALWAYS/REPLICA: "
                    'it fires even with triggers = "skip"'
                )

    def _row_security(self, plans: dict[str, TablePlan]) -> None:
        for side, catalog, effect in (
            ("source", self.source, "rows their policies hide are not copied"),
            ("target", self.target, "their policies may refuse the copy's writes"),
        ):
            hidden = [n for n in plans if catalog.tables[n].row_security]
            if catalog.bypass_rls or not hidden:
                continue
            self.warnings.append(
                f"the {side} login does not bypass row level security and {', '.join(hidden)} "
                f"enforce it: {effect}; connect as postgres (BYPASSRLS)"
            )

    # ------------------------------------------------------------------------------------ order

    def _order(self, plans: dict[str, TablePlan]) -> list[TablePlan]:
        """Parents first; a cycle is broken on a nullable link, deferred to a second pass."""
        links = {
            name: [link for link in plan.parents if link.parent in plans and link.parent != name]
            for name, plan in plans.items()
        }
        deferred: dict[str, list[ParentLink]] = {name: [] for name in plans}
        for component in _components(plans, lambda n: [link.parent for link in links[n]]):
            if len(component) > 1:
                self._break_cycle(set(component), links, deferred)
        kept = {name: [link for link in links[name] if link not in deferred[name]] for name in plans}
        ordered = _topological(plans, lambda n: {link.parent for link in kept[n]})
        for name in ordered:
            for link in deferred[name]:
                self.notes.append(
                    f"{name}: foreign key ({', '.join(link.columns)}) → {link.parent} closes a cycle: "
                    f"inserted as NULL, then set in a second pass"
                )
        return [replace(plans[name], deferred=deferred[name]) for name in ordered]

    def _break_cycle(
        self,
        component: set[str],
        links: dict[str, list[ParentLink]],
        deferred: dict[str, list[ParentLink]],
    ) -> None:
        inner = [
            (name, link) for name in sorted(component) for link in links[name] if link.parent in component
        ]
        kept = [(name, link) for name, link in inner if not link.nullable]
        cycle = _find_cycle(component, kept)
        if cycle:
            steps = " → ".join([*cycle, cycle[0]])
            columns = ", ".join(
                f"{name}.{'/'.join(link.columns)}"
                for name, link in inner
                if name in cycle and not link.nullable
            )
            self.problems.append(
                f"foreign-key cycle {steps} cannot be broken: none of its links is nullable ({columns}); "
                f"make one of these columns nullable in target, or skip = true for one of the tables"
            )
            return
        # Keep as many links as the order allows: each one deferred costs a second pass of updates.
        for name, link in inner:
            if link.nullable:
                if _find_cycle(component, [*kept, (name, link)]):
                    deferred[name].append(link)
                else:
                    kept.append((name, link))


def _user_tables(target: Catalog) -> set[str]:
    """``auth.users`` and the tables whose primary key is a foreign key to it (one row per user)."""
    owners = {AUTH_USERS}
    for name, table in target.tables.items():
        if any(fk.referenced == AUTH_USERS and fk.columns == table.primary_key for fk in table.foreign_keys):
            owners.add(name)
    return owners


def _quoted(labels: Sequence[str]) -> str:
    return ", ".join(repr(label) for label in labels)


def _components(nodes: Iterable[str], parents: Callable[[str], Iterable[str]]) -> list[list[str]]:
    """Strongly connected components (Tarjan's algorithm, iterative), each sorted by name."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for root in sorted(nodes):
        if root in index:
            continue
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        work = [(root, iter(sorted(parents(root))))]
        while work:
            node, todo = work[-1]
            for nxt in todo:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(parents(nxt)))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    caller = work[-1][0]
                    low[caller] = min(low[caller], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
    return components


def _find_cycle(nodes: set[str], links: Sequence[tuple[str, ParentLink]]) -> list[str]:
    """A cycle through ``links`` among ``nodes`` as the list of its tables, or [] when there is none."""
    graph: dict[str, list[str]] = {n: [] for n in nodes}
    for name, link in links:
        graph[name].append(link.parent)
    for component in _components(nodes, lambda n: graph[n]):
        if len(component) > 1:
            start = component[0]
            # Walk from start along links inside the component until it comes back: the component
            # is strongly connected, so a breadth-first search from start's parents reaches start.
            previous: dict[str, str] = {}
            frontier = [start]
            while frontier:
                step = []
                for node in frontier:
                    for nxt in sorted(graph[node]):
                        if nxt in component and nxt not in previous:
                            previous[nxt] = node
                            step.append(nxt)
                if start in previous:
                    break
                frontier = step
            path = [start]
            node = previous[start]
            while node != start:
                path.append(node)
                node = previous[node]
            return [path[0], *reversed(path[1:])]
    return []


def _topological(nodes: Iterable[str], parents: Callable[[str], set[str]]) -> list[str]:
    """Nodes with every parent before its children; ties in name order. The graph must be acyclic."""
    waiting = {n: set(parents(n)) for n in nodes}
    children: dict[str, list[str]] = {n: [] for n in waiting}
    for name, deps in waiting.items():
        for parent in deps:
            children[parent].append(name)
    ready = [n for n, deps in waiting.items() if not deps]
    heapq.heapify(ready)
    ordered = []
    while ready:
        name = heapq.heappop(ready)
        ordered.append(name)
        for child in children[name]:
            waiting[child].discard(name)
            if not waiting[child]:
                heapq.heappush(ready, child)
    # An unbroken cycle (already reported as a problem) leaves its tables waiting: list them last.
    return ordered + sorted(n for n in waiting if n not in ordered)


# ---------------------------------------------------------------------------------------------- casts


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
    schema, table = sqltext.split_name(plan.name)
    statement = (
        f"EXPLAIN INSERT INTO {sqltext.ident(schema)}.{sqltext.ident(table)} "
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


# ---------------------------------------------------------------------------------------------- report


class TriggerReport(BaseModel):
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


class TableReport(BaseModel):
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
    policy: str
    columns: list[str]
    casts: dict[str, str]
    new_columns: dict[str, str | None]
    parents: list[str]
    deferred: list[str]
    trigger_mode: str
    triggers: list[TriggerReport]
    window_rows: int | None = None
    """Source rows in the window (None when not counted)."""
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


class UserReport(BaseModel):
    """How the source's users meet the target's: each source user is counted once, in this order."""

    model_config = ConfigDict(extra="forbid")

    source: int
    target: int
    matched_by_id: int
    matched_by_email: int
    matched_by_phone: int
    to_create: int


class PlanReport(BaseModel):
    """What ``sync plan --json`` prints: the plan, the counts behind it, and what stands in its way."""

    model_config = ConfigDict(extra="forbid")

    source: str
    target: str
    source_version: int
    target_version: int
    mapping: str
    since: datetime | None
    """Rows whose since-column is at or after this instant are in the window; None: whole tables."""
    auth_mode: str
    tables: list[TableReport]
    users: UserReport | None = None
    auth_triggers: list[TriggerReport]
    notes: list[str]
    warnings: list[str]
    errors: list[str]
