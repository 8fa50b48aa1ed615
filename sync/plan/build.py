"""Drawing the plan: which tables a run copies, column by column — or every reason it would lose data.

:func:`build_plan` compares the source and target catalogs through the mapping and is pure: no I/O, the
same catalogs and mapping give the same plan. Everything that could lose data is a problem, and all
problems are reported together in one :class:`~sync.errors.PlanError`, each naming ``table.column`` and
the mapping line that would fix it. Only the cast check needs the target itself
(:func:`sync.plan.casts.check_casts`): whether a type can be stored in another is the target's rule, not
a table kept here.

Defaults for a table without a mapping entry:

- key: a single uuid primary key is ``preserve``; a single integer key is ``remap``; anything else is
  ``preserve``. A table without primary key needs ``key = "natural"``.
- match_on (``remap``): ``created_at`` when copied, plus the columns of foreign keys that point at a
  user — at ``auth.users`` or at a table whose primary key is itself a foreign key to ``auth.users``
  (the ``profiles`` pattern). Two rows with the same key are the same row when these agree.
- since: ``updated_at`` when the source has it, else ``created_at``, else the whole table.
- policy: ``source-wins``; triggers: the ``[sync]`` setting (``fire`` unless changed).

A little over ~400 lines: the planner is one pass over the tables whose checks read each other's
results; the notes that stand alone already live in :mod:`sync.plan.drift`.
"""

from __future__ import annotations

from collections.abc import Iterable

from sync import sqltext
from sync.catalog import Catalog, Column, Table
from sync.errors import PlanError
from sync.mapping import Mapping, TableRule, table_header, toml_key, toml_string
from sync.modes import ConflictPolicy, KeyStrategy
from sync.plan.drift import check_notes, enum_drift, row_security_warnings, trigger_warnings
from sync.plan.model import AUTH_USERS, ColumnPlan, ParentLink, Plan, TablePlan
from sync.plan.order import order_tables

INTEGER_TYPES = ("int2", "int4", "int8")
WINDOW_TYPES = ("timestamptz", "timestamp", "date")


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
        notes, warnings = enum_drift(self.source, self.target)
        self.notes += notes
        self.warnings += warnings
        self.warnings += row_security_warnings(self.source, self.target, plans)
        order = order_tables(plans)
        self.problems += order.problems
        self.notes += order.notes
        auth_users = self.target.tables.get(AUTH_USERS)
        return Plan(
            tables=order.tables,
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
        key, match_on, natural = self._key(name, rule, src, tgt, copied)
        since = self._since(name, rule, src)
        policy = rule.policy or ConflictPolicy.SOURCE_WINS
        if policy == ConflictPolicy.NEWEST_WINS and "updated_at" not in copied:
            self.problems.append(
                f'{name}: policy = "newest-wins" compares updated_at, which is not copied: '
                f"choose another policy under {table_header(name)}"
            )
        self.notes += check_notes(name, src, tgt)
        trigger_mode = rule.triggers or self.mapping.sync.triggers
        self.warnings += trigger_warnings(name, tgt.triggers, trigger_mode)
        if since is not None and since not in src.indexed:
            self.warnings.append(
                f"{name}: since-column {since} has no index in source, so every run scans the whole table "
                f"(CREATE INDEX ON {sqltext.ident(src.schema)}.{sqltext.ident(src.table)} "
                f"({sqltext.ident(since)}))"
            )
        if key is None:
            return None
        table_plan = TablePlan(
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
            key_margin=self.mapping.sync.key_margin,
        )
        if table_plan.allocates_keys:
            self.notes.append(
                f"{name}: a row whose key {table_plan.primary_key[0]} is taken by another target row gets "
                f"a new key past production's highest plus {table_plan.key_margin:,} (key_margin under "
                f"[sync]), out of the way of the keys production issues next"
            )
        return table_plan

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
        self, name: str, rule: TableRule, src: Table, tgt: Table, copied: set[str]
    ) -> tuple[KeyStrategy | None, tuple[str, ...], tuple[str, ...]]:
        header = table_header(name)
        pk = tgt.primary_key
        key: KeyStrategy | None = rule.key
        if key is None and pk:
            integer = len(pk) == 1 and tgt.columns[pk[0]].type_name in INTEGER_TYPES
            key = KeyStrategy.REMAP if integer else KeyStrategy.PRESERVE
        elif key is None and rule.natural:
            key = KeyStrategy.NATURAL
        if key is None:
            self.problems.append(
                f'{name} has no primary key in target and no natural key: add key = "natural" and '
                f'natural = ["..."] (columns with a unique constraint) under {header}, or skip = true'
            )
            return None, (), ()
        natural = tuple(rule.natural or ())
        if key == KeyStrategy.NATURAL:
            if not any(set(u) == set(natural) for u in [*tgt.unique, pk]):
                self.problems.append(
                    f"{name}: natural = [{', '.join(map(toml_string, natural))}] has no unique constraint "
                    f"or index in target, "
                    f"so it cannot identify a row: choose unique columns under {header}"
                )
            self._require_copied(name, "natural", natural, copied)
            self._require_not_null(name, rule, natural, src, tgt)
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
        if key != KeyStrategy.REMAP:
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

    def _require_not_null(
        self, name: str, rule: TableRule, natural: Iterable[str], src: Table, tgt: Table
    ) -> None:
        """A natural key column must refuse NULL on both sides: a NULL matches nothing and pages nowhere."""
        renamed = {new: old for old, new in rule.rename.items()}
        for column in natural:
            source_column = src.columns.get(renamed.get(column, column))
            target_column = tgt.columns.get(column)
            nullable = [
                side
                for side, col in (("source", source_column), ("target", target_column))
                if col is not None and col.nullable
            ]
            if nullable:
                self.problems.append(
                    f"{name}.{column} is in natural but accepts NULL in {' and '.join(nullable)}, so a row "
                    f"with NULL there cannot be matched: make it NOT NULL or choose other columns under "
                    f"{table_header(name)}"
                )

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


def _user_tables(target: Catalog) -> set[str]:
    """``auth.users`` and the tables whose primary key is a foreign key to it (one row per user)."""
    owners = {AUTH_USERS}
    for name, table in target.tables.items():
        if any(fk.referenced == AUTH_USERS and fk.columns == table.primary_key for fk in table.foreign_keys):
            owners.add(name)
    return owners
