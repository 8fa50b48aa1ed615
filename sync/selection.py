"""Which source rows a run moves: the window and the closure, written once as SQL.

The **window** is a table's rows whose since-column is at or after ``--since`` (a NULL since-column
counts as in it: an unknown date is no reason to leave a row behind). The **closure** adds the rows a
selected child row points at, through every foreign key between planned tables, recursively. A
quarantine retry selects exactly the quarantined keys instead.

The copy reads its batches with these predicates, ``sync plan`` counts the window with them and
``sync verify`` looks for the same rows on the target; so plan, run and verify always agree on which
rows a run is about. Every value (the since instant, the retried keys) is a bound parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from sync.plan import ParentLink, Plan, TablePlan
from sync.sqltext import Params, column_list, ident, table_ident

Predicate = Callable[[Params], str]
"""SQL text of a condition over a source table, its values bound into the statement's parameters."""


def source_key_columns(tp: TablePlan) -> list[str]:
    """The table's primary key, named as the source names its columns."""
    by_target = {c.target: c.source for c in tp.columns}
    return [by_target[k] for k in tp.primary_key]


def key_text_sql(tp: TablePlan, alias: str = "") -> str:
    """SQL (over the source table) giving a row's key as one text value, as the id map stores it."""
    cols = source_key_columns(tp)
    if len(cols) == 1:
        return f"{alias}{ident(cols[0])}::text"
    return f"jsonb_build_array({column_list(cols, alias)})::text"


def links(tp: TablePlan) -> list[ParentLink]:
    """Every foreign key of the table once (deferred links are among the parents too)."""
    return list(dict.fromkeys([*tp.parents, *tp.deferred]))


def key_owners(plan: Plan, table: str) -> list[str]:
    """The tables whose id map entries apply to ``table``'s keys.

    A table whose primary key is also a foreign key (``profiles.id`` → ``auth.users.id``) has no keys
    of its own: a user mapped to another id takes its profile along, and so every row pointing at the
    profile must follow the user's mapping too.
    """
    owners, seen = [table], {table}
    by_name = {t.name: t for t in plan.tables}
    while (tp := by_name.get(owners[-1])) is not None:
        parent = next(
            (
                link.parent
                for link in tp.parents
                if link.columns == tp.primary_key and link.parent not in seen
            ),
            None,
        )
        if parent is None:
            break
        owners.append(parent)
        seen.add(parent)
    return owners


class Selection:
    """The conditions that pick a table's source rows for a run: window, closure, or retried keys."""

    def __init__(
        self, plan: Plan, since: datetime | None, only_keys: dict[str, list[str]] | None = None
    ) -> None:
        self.plan = plan
        self.since = since
        self.only_keys = only_keys  # when set: exactly these source keys per table (a quarantine retry)

    def in_window(self, tp: TablePlan, params: Params, alias: str = "") -> str:
        """True for rows whose since-column is in the window (NULL since-columns count as in it)."""
        if self.only_keys is not None or self.since is None or tp.since is None:
            return "true"
        col = f"{alias}{ident(tp.since)}"
        return f"({col} >= {params.bind(self.since, 'timestamptz')} OR {col} IS NULL)"

    def selected(
        self, tp: TablePlan, params: Params, alias: str = "", seen: frozenset[str] = frozenset()
    ) -> str:
        """In the window, or referenced by a selected child row (the closure), recursively."""
        if self.only_keys is not None:
            keys = params.bind(self.only_keys.get(tp.name, []), "text[]")
            return f"({key_text_sql(tp, alias)} = ANY({keys}))"
        window = self.in_window(tp, params, alias)
        if window == "true":
            return "true"
        referenced = self.referenced(tp, params, alias, seen)
        return f"({window} OR {referenced})" if referenced else window

    def referenced(
        self, tp: TablePlan, params: Params, alias: str = "", seen: frozenset[str] = frozenset()
    ) -> str | None:
        """Rows of ``tp`` that some selected child row points at; None when no copied table points here.

        Children are gathered per referenced column set into one ``IN (… UNION ALL …)``, which the
        planner runs as one hashed lookup per query instead of one per child.
        """
        seen = seen | {tp.name}
        parent_by_target = {c.target: c.source for c in tp.columns}
        branches: dict[tuple[str, ...], list[str]] = {}
        for child in self.plan.tables:
            if child.name in seen:
                continue
            child_by_target = {c.target: c.source for c in child.columns}
            for link in links(child):
                if link.parent != tp.name:
                    continue
                fk = [child_by_target[c] for c in link.columns if c in child_by_target]
                pk = tuple(parent_by_target[c] for c in link.parent_columns if c in parent_by_target)
                if len(fk) != len(link.columns) or len(pk) != len(link.parent_columns):
                    continue
                inner = self.selected(child, params, "c.", seen)
                branches.setdefault(pk, []).append(
                    f"SELECT {column_list(fk, 'c.')} FROM {table_ident(child.source_name)} AS c WHERE {inner}"
                )
        clauses = []
        for pk, selects in branches.items():
            left = column_list(pk, alias) if len(pk) == 1 else f"({column_list(pk, alias)})"
            clauses.append(f"{left} IN ({' UNION ALL '.join(selects)})")
        return "(" + " OR ".join(clauses) + ")" if clauses else None

    def phases(self, tp: TablePlan) -> list[Predicate]:
        """The table's selection as passes over its key range: the window first, then the closure.

        Keeping the closure out of the window pass keeps each window batch a plain range scan; the
        closure pass then reads only out-of-window rows that a child needs (usually few).
        """
        if self.only_keys is not None or self.selected(tp, Params()) == "true":
            return [lambda params: self.selected(tp, params)]
        if self.referenced(tp, Params()) is None:
            return [lambda params: self.in_window(tp, params)]
        return [
            lambda params: self.in_window(tp, params),
            lambda params: f"NOT {self.in_window(tp, params)} AND {self.referenced(tp, params)}",
        ]
