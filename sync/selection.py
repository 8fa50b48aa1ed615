"""Which source rows a run moves: the window and the closure, written once as SQL.

The **window** is a table's rows whose since-column is at or after ``--since`` (a NULL since-column
counts as in it: an unknown date is no reason to leave a row behind). On a catch-up it is also every
row **changed** since the previous run: whose row version a transaction wrote after that run's
snapshot (its ``xmin`` at or above the snapshot's xmin). That proof does not depend on the app's
clock columns: edits that leave ``updated_at`` alone, transactions that commit long after they
stamped it, and NULL since-columns are all caught. The **closure** adds the rows a
selected child row points at, through every foreign key between planned tables, recursively. A
quarantine retry selects exactly the quarantined keys instead.

The copy reads its batches with these predicates, ``sync plan`` counts the window with them and
``sync verify`` looks for the same rows on the target; so plan, run and verify always agree on which
rows a run is about. Every value (the since instant, the retried keys) is a bound parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sync.plan import ParentLink, Plan, TablePlan
from sync.sqltext import Params, column_list, ident, table_ident

Predicate = Callable[[Params], str]
"""SQL text of a condition over a source table, its values bound into the statement's parameters."""


CLOSURE_PASS = 1
"""The index of the closure's pass among a table's :meth:`Selection.phases` (the window's is 0)."""

XID_SPAN = 1 << 32
"""A row's ``xmin`` is a 32-bit transaction id; the epoch that widens it to 64 bits is not stored."""
INT4_MAX = (1 << 31) - 1


@dataclass(frozen=True)
class Changes:
    """A catch-up's span of transactions: from the previous run's snapshot to this run's.

    ``seen`` is the previous run's whole snapshot (``pg_current_snapshot()`` as text) when it was
    recorded: a row version written at or above its xmin that it nevertheless saw (its transaction had
    committed, while an older one was still open) is not a change. Without it, every version written at
    or above ``from_xid`` counts as changed (read again, never missed).

    ``held`` are the source keys per table (``auth.users`` for users) still in quarantine: an earlier
    run held them back, so every catch-up reads them again until they land, changed or not.
    """

    from_xid: int
    upto_xid: int
    held: Mapping[str, Sequence[str]] = field(default_factory=dict)
    seen: str | None = None
    quiet: frozenset[str] = frozenset()
    """Tables (``auth.users`` for users) the run's census found nothing to read in: neither rows in
    their window nor rows their children's windows need (:mod:`sync.census`)."""
    keyed: Mapping[str, Sequence[str]] = field(default_factory=dict)
    """Per table, the keys of every row in its window, as the run's census listed them (when few): the
    window is then read by its key index instead of by a scan of the table."""

    @classmethod
    def since_snapshot(cls, seen: str, upto_xid: int) -> Changes:
        """The span from a recorded snapshot (``xmin:xmax:xip,…``) to ``upto_xid``."""
        return cls(int(seen.split(":", 1)[0]), upto_xid, seen=seen)

    def sql(self, params: Params, alias: str = "") -> str:
        """True for row versions written by a transaction in the span, or ``true`` when it is unknowable.

        The row's 32-bit ``xmin`` is compared by its ``age()``: this transaction's next id minus the
        version's, modulo 2^32, as a signed 32-bit number (cheap: no text conversion per row). A version is
        in the span when its age is between 0 and the age of ``from_xid`` (the next id is at or past
        ``upto_xid``, and every version this snapshot sees was written below it). PostgreSQL freezes
        versions long before they are 2^31 transactions old, so that tells newer from older versions —
        of the previous epoch too — safe across wraparound; a version whose age is negative is neither
        (written after this snapshot, or a frozen id from another epoch). A span of 2^31 or more (or a
        negative one: another server) cannot be told apart, and then every row counts as changed; so does
        every row when ``from_xid`` is itself too old to tell. With the previous snapshot known, a version
        in the span is a change only when that snapshot did not see it (its 64-bit id is ``from_xid``
        plus its offset).
        """
        span = self.upto_xid - self.from_xid
        if not 0 <= span < XID_SPAN // 2:
            return "true"
        start = params.bind(self.from_xid % XID_SPAN, "bigint")
        bound = f"(SELECT CASE WHEN a >= 0 THEN a ELSE {INT4_MAX} END FROM age({start}::text::xid) AS a)"
        newer = f"age({alias}xmin) BETWEEN 0 AND {bound}"
        if self.seen is None:
            return f"({newer})"
        offset = f"(({alias}xmin::text::bigint - {start} + {XID_SPAN}) % {XID_SPAN})"
        xid = f"({params.bind(self.from_xid, 'bigint')} + {offset})::text::xid8"
        seen = f"{params.bind(self.seen, 'text')}::pg_snapshot"
        return f"({newer} AND NOT pg_visible_in_snapshot({xid}, {seen}))"


def source_columns(tp: TablePlan, columns: Sequence[str]) -> list[str]:
    """Target column names of ``tp``, named as the source names them."""
    by_target = {c.target: c.source for c in tp.columns}
    return [by_target[c] for c in columns]


def source_key_columns(tp: TablePlan) -> list[str]:
    """The columns a row is known by (its natural key, else its primary key), named as in the source."""
    return source_columns(tp, tp.row_key)


def key_text_sql(tp: TablePlan, alias: str = "") -> str:
    """SQL (over the source table) giving a row's key as one text value, as checkpoints and quarantine
    keep it: the natural key for ``natural`` tables, else the primary key."""
    cols = source_key_columns(tp)
    if len(cols) == 1:
        return f"{alias}{ident(cols[0])}::text"
    return f"jsonb_build_array({column_list(cols, alias)})::text"


def target_key_sql(tp: TablePlan, alias: str = "") -> str:
    """SQL (over a target or staged row) giving its key as one text value, as the ledger stores it: the
    columns a row is known by (its natural key, else its primary key), as :func:`key_text_sql` reads them."""
    if len(tp.row_key) == 1:
        return f"{alias}{ident(tp.row_key[0])}::text"
    return f"jsonb_build_array({column_list(tp.row_key, alias)})::text"


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


@dataclass(frozen=True)
class _Edge:
    """A foreign key between planned tables, in source names: ``child.fk`` → ``parent.referenced``."""

    child: TablePlan
    fk: tuple[str, ...]
    parent: TablePlan
    referenced: tuple[str, ...]
    deferred: bool


class Selection:
    """The conditions that pick a table's source rows for a run: window, closure, or retried keys."""

    def __init__(
        self,
        plan: Plan,
        since: datetime | None,
        only_keys: dict[str, list[str]] | None = None,
        changes: Changes | None = None,
    ) -> None:
        self.plan = plan
        self.since = since
        self.only_keys = only_keys  # when set: exactly these source keys per table (a quarantine retry)
        self._tables = {t.name: t for t in plan.tables}
        self.changes = changes  # on a catch-up: the transactions since the previous run's snapshot

    def quiet(self, tp: TablePlan) -> bool:
        """Whether the run's census found nothing to read in the table (nor any row a child needs)."""
        return self.only_keys is None and self.changes is not None and tp.name in self.changes.quiet

    def in_window(self, tp: TablePlan, params: Params, alias: str = "", column: str | None = None) -> str:
        """True for rows whose since-column is in the window, or changed since the previous run.

        Without a span of transactions (a first run), NULL since-columns count as in the window; on a
        catch-up a row with a NULL since-column is read when it changed, like any other. ``column``
        names the since-column when it is not the source's (the target's copy of it).
        """
        if self.only_keys is not None or self.since is None:
            return "true"
        keyed = self.changes.keyed.get(tp.name) if self.changes is not None and column is None else None
        if keyed is not None:
            (key,) = source_key_columns(tp)
            of_type = tp.staged_types[tp.row_key[0]]
            return f"({alias}{ident(key)} = ANY({params.bind(list(keyed), 'text[]')}::{of_type}[]))"
        changed = self.changes.sql(params, alias) if self.changes is not None else None
        held = self.changes.held.get(tp.name) if self.changes is not None else None
        if changed is not None and held:
            changed = f"({changed} OR {key_text_sql(tp, alias)} = ANY({params.bind(list(held), 'text[]')}))"
        if tp.since is None:
            return changed or "true"
        col = f"{alias}{ident(column or tp.since)}"
        recent = f"{col} >= {params.bind(self.since, 'timestamptz')}"
        return f"({recent} OR {changed or f'{col} IS NULL'})"

    def selected(self, tp: TablePlan, params: Params, alias: str = "") -> str:
        """In the window, or needed by a selected row through a foreign key (the closure)."""
        if self.only_keys is not None:
            keys = params.bind(self.only_keys.get(tp.name, []), "text[]")
            return f"({key_text_sql(tp, alias)} = ANY({keys}))"
        window = self.in_window(tp, params, alias)
        if window == "true":
            return "true"
        closure = self.closure_sql(tp, params, with_window=True)
        if closure is None:
            return window
        return f"({column_list(source_key_columns(tp), alias)}) IN ({closure})"

    def phases(self, tp: TablePlan) -> list[Predicate]:
        """The table's selection as passes over its key range: the window first, then the closure.

        Keeping the closure out of the window pass keeps each window batch a plain range scan; the
        closure pass then reads only out-of-window rows that a selected row needs (usually few).
        """
        if self.only_keys is not None or self.in_window(tp, Params()) == "true":
            return [lambda params: self.selected(tp, params)]
        if self.closure_sql(tp, Params()) is None:
            return [lambda params: self.in_window(tp, params)]
        keys = column_list(source_key_columns(tp))

        def closure_pass(params: Params) -> str:
            return f"NOT {self.in_window(tp, params)} AND ({keys}) IN ({self.closure_sql(tp, params)})"

        return [lambda params: self.in_window(tp, params), closure_pass]

    def closure_sql(self, tp: TablePlan, params: Params, with_window: bool = False) -> str | None:
        """The keys of ``tp``'s source rows a selected row needs (and, ``with_window``, its window's);
        None when no copied row can point at ``tp``.

        One ``WITH RECURSIVE`` query over the source: a CTE per table that (transitively) points at
        ``tp``, each holding that table's selected rows — its window, plus the rows its selected
        children point at — children before parents, so a chain of any length is followed once per
        link. A table's references to itself are followed by the CTE's recursive term (a reply, its
        parent, the parent's parent…). Links between CTEs are equi-joins the planner hashes, and the
        caller uses the result as a semi-join: every table is read once per query, whatever the depth.
        A link that closes a cycle between tables is followed one step, from its child's window.
        """
        root = self._tables.get(tp.name, tp)
        order = self._descendants(root)
        if not self._incoming(root):
            return None
        names = {t.name: f"sel_{i}" for i, t in enumerate(order)}
        ctes = [
            f"{names[t.name]} AS ({self._selected_rows(t, params, names, root, with_window)})" for t in order
        ]
        keys = column_list(source_key_columns(root))
        return f"WITH RECURSIVE {', '.join(ctes)} SELECT {keys} FROM {names[root.name]}"

    # ------------------------------------------------------------------------------------ closure

    def _incoming(self, parent: TablePlan) -> list[_Edge]:
        """Every foreign key of a planned table that points at ``parent`` with all its columns copied."""
        edges = []
        for child in self.plan.tables:
            child_cols = {c.target: c.source for c in child.columns}
            parent_cols = {c.target: c.source for c in parent.columns}
            for link in links(child):
                if link.parent != parent.name:
                    continue
                if not all(c in child_cols for c in link.columns):
                    continue
                if not all(c in parent_cols for c in link.parent_columns):
                    continue
                edges.append(
                    _Edge(
                        child=child,
                        fk=tuple(child_cols[c] for c in link.columns),
                        parent=parent,
                        referenced=tuple(parent_cols[c] for c in link.parent_columns),
                        deferred=link in child.deferred and child.name != parent.name,
                    )
                )
        return edges

    def _followed(self, parent: TablePlan) -> list[_Edge]:
        """Edges whose child's whole selection feeds ``parent``: neither self-references nor cycle links."""
        return [e for e in self._incoming(parent) if e.child.name != parent.name and not e.deferred]

    def _descendants(self, root: TablePlan) -> list[TablePlan]:
        """``root`` and every table whose rows lead to it through followed edges, children first."""
        order: list[TablePlan] = []
        placed: set[str] = set()

        def visit(table: TablePlan, path: frozenset[str]) -> None:
            for edge in self._followed(table):
                if edge.child.name not in placed and edge.child.name not in path:
                    visit(edge.child, path | {table.name})
            if table.name not in placed:
                placed.add(table.name)
                order.append(table)

        visit(root, frozenset())
        return order

    def _carried(self, table: TablePlan, names: dict[str, str], root: TablePlan) -> list[str]:
        """The source columns a table's CTE keeps: its key if it is the root, the columns its links use."""
        columns = list(source_key_columns(table)) if table.name == root.name else []
        for edge in self._incoming(table):
            if edge.child.name in names or edge.deferred:
                columns += edge.referenced
        for parent_name in names:
            for edge in self._incoming(self._tables.get(parent_name, root)):
                if edge.child.name == table.name and not edge.deferred:
                    columns += edge.fk
        return list(dict.fromkeys(columns))

    def _selected_rows(
        self, table: TablePlan, params: Params, names: dict[str, str], root: TablePlan, with_window: bool
    ) -> str:
        """The CTE body of one table: window, rows its selected children need, then its self-references.

        The root's own window is left out unless asked for, or needed to start its self-references.
        """
        cols = self._carried(table, names, root)
        rel = table_ident(table.source_name)
        out = column_list(cols, "x.")
        selves = [e for e in self._incoming(table) if e.child.name == table.name]
        branches = []
        if table.name != root.name or with_window or selves:
            branches.append(f"SELECT {out} FROM {rel} AS x WHERE {self.in_window(table, params, 'x.')}")
        for edge in self._incoming(table):
            if edge.child.name == table.name or not (edge.deferred or edge.child.name in names):
                continue
            if edge.deferred:
                child = table_ident(edge.child.source_name)
                window = self.in_window(edge.child, params, "c.")
            else:
                child, window = names[edge.child.name], "true"
            by_referenced = dict(zip(edge.referenced, edge.fk, strict=True))
            if set(cols) <= set(by_referenced):
                # The child's columns are all this table keeps: no need to read the table here (the
                # caller's semi-join meets the rows that exist).
                picked = ", ".join(f"c.{ident(by_referenced[c])} AS {ident(c)}" for c in cols)
                present = " AND ".join(f"c.{ident(by_referenced[c])} IS NOT NULL" for c in cols)
                branches.append(f"SELECT {picked} FROM {child} AS c WHERE {window} AND {present}")
            else:
                on = f"({column_list(edge.referenced, 'x.')}) = ({column_list(edge.fk, 'c.')})"
                branches.append(f"SELECT {out} FROM {rel} AS x JOIN {child} AS c ON {on} WHERE {window}")
        if selves:
            on = " OR ".join(
                f"({column_list(e.referenced, 'x.')}) = ({column_list(e.fk, 's.')})" for e in selves
            )
            branches.append(f"SELECT {out} FROM {rel} AS x JOIN {names[table.name]} AS s ON {on}")
        return " UNION ".join(branches)
