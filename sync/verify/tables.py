"""A planned table on both sides, as the rows :mod:`sync.compare` compares.

Both sides speak the source's key space: a target row's key, and each foreign key value, is turned
back into the production key it came from through ``_sync.id_map`` (remapped rows, users matched by
e-mail). A target key that the map sends elsewhere (a development row holding a key production used)
is marked with a ``!`` prefix, so it never passes for production's row; such rows are out of scope.

Values are compared as text in the **target's type**: the source casts a column whose type drifted to
the target's type (when the source knows that type) before taking its text, and both sessions share
the target's time zone and the same date, interval, float and bytea output settings, so equal values
print alike.
"""

from __future__ import annotations

from datetime import datetime

import asyncpg

from sync.compare import Relation
from sync.plan import Plan, TablePlan
from sync.selection import Selection, key_owners, key_text_sql, links
from sync.sqltext import Params, column_list, ident, table_ident

SESSION_SETTINGS = {
    "DateStyle": "ISO, YMD",
    "IntervalStyle": "postgres",
    "extra_float_digits": "1",
    "bytea_output": "hex",
}
"""Output settings both sides share, so that equal values have equal text (TimeZone: the target's)."""


async def share_output_settings(sconn: asyncpg.Connection, tconn: asyncpg.Connection) -> None:
    """Give both sessions (inside their transactions) the same output settings and the target's time zone."""
    zone = await tconn.fetchval("SELECT current_setting('TimeZone')")
    for conn in (sconn, tconn):
        for name, value in {**SESSION_SETTINGS, "TimeZone": zone}.items():
            await conn.execute("SELECT set_config($1, $2, true)", name, value)


def mapped_columns(plan: Plan, tp: TablePlan) -> dict[str, list[str]]:
    """Target column → the id-map tables its values follow (the key, and single-column foreign keys)."""
    mapped: dict[str, list[str]] = {}
    if len(tp.primary_key) == 1:
        mapped[tp.primary_key[0]] = key_owners(plan, tp.name)
    for link in links(tp):
        if len(link.columns) == 1 and link.columns[0] not in mapped:
            mapped[link.columns[0]] = key_owners(plan, link.parent)
    return mapped


async def source_casts(sconn: asyncpg.Connection, tp: TablePlan) -> set[str]:
    """The drifted columns' target types that the source knows (so it can cast to them)."""
    drifted = sorted({c.target_type for c in tp.columns if c.source_type != c.target_type})
    if not drifted:
        return set()
    rows = await sconn.fetch("SELECT t FROM unnest($1::text[]) AS t WHERE to_regtype(t) IS NOT NULL", drifted)
    return {r["t"] for r in rows}


def source_relation(plan: Plan, tp: TablePlan, since: datetime | None, castable: set[str]) -> Relation:
    """The production rows in scope: the window (``since``) or the whole table."""
    mapped = mapped_columns(plan, tp)
    params = Params()
    columns = []
    for c in tp.columns:
        value = f"t.{ident(c.source)}"
        if c.target not in mapped and c.source_type != c.target_type and c.target_type in castable:
            value = f"{value}::{c.target_type}"
        columns.append((c.target, f"{value}::text"))
    where = Selection(plan, since).in_window(tp, params, "t.")
    return Relation(f"{table_ident(tp.source_name)} AS t", key_text_sql(tp, "t."), columns, where, params)


def target_relation(plan: Plan, tp: TablePlan, since: datetime | None, has_map: bool) -> Relation:
    """The target's rows under production keys: keys and references turned back through the id map."""
    mapped = mapped_columns(plan, tp) if has_map else {}
    params = Params()
    joins, value, foreign = [], {}, {}
    for n, (col, owners) in enumerate(mapped.items()):
        owned = params.bind(owners, "text[]")
        entries = f"(SELECT source_key, target_key FROM _sync.id_map WHERE table_name = ANY({owned}))"
        joins.append(
            f"LEFT JOIN {entries} AS r{n} ON r{n}.target_key = t.{ident(col)}::text "
            f"LEFT JOIN {entries} AS f{n} ON f{n}.source_key = t.{ident(col)}::text "
            f"AND r{n}.source_key IS NULL"
        )
        value[col] = (
            f"CASE WHEN r{n}.source_key IS NOT NULL THEN r{n}.source_key "
            f"WHEN f{n}.source_key IS NOT NULL THEN '!' || t.{ident(col)}::text "
            f"ELSE t.{ident(col)}::text END"
        )
        foreign[col] = f"f{n}.source_key IS NOT NULL"
    columns = [(c.target, value.get(c.target, f"t.{ident(c.target)}::text")) for c in tp.columns]
    if tp.key == "natural":  # a natural key is the target's own value on both sides
        natural = column_list(tp.row_key, "t.")
        key = f"{natural}::text" if len(tp.row_key) == 1 else f"jsonb_build_array({natural})::text"
    elif len(tp.primary_key) == 1:
        key = value.get(tp.primary_key[0], f"t.{ident(tp.primary_key[0])}::text")
    else:
        types = tp.target_types
        parts = [
            f"CASE WHEN {foreign[k]} THEN to_jsonb({value[k]}) "
            f"WHEN r{list(mapped).index(k)}.source_key IS NOT NULL "
            f"THEN to_jsonb(r{list(mapped).index(k)}.source_key::{types[k]}) ELSE to_jsonb(t.{ident(k)}) END"
            if k in mapped
            else f"t.{ident(k)}"
            for k in tp.primary_key
        ]
        key = f"jsonb_build_array({', '.join(parts)})::text"
    where = [foreign[k] for k in tp.primary_key if k in foreign and tp.key != "natural"]
    where = [f"NOT ({w})" for w in where]
    window = _target_window(plan, tp, since, params)
    return Relation(
        f"{table_ident(tp.name)} AS t {' '.join(joins)}", key, columns, " AND ".join([window, *where]), params
    )


def _target_window(plan: Plan, tp: TablePlan, since: datetime | None, params: Params) -> str:
    """The window over the target's copy of the since-column (no window when it is not copied)."""
    column = next((c.target for c in tp.columns if c.source == tp.since), None)
    if column is None:
        return "true"
    return Selection(plan, since).in_window(tp, params, "t.", column=column)


async def quarantined(tconn: asyncpg.Connection, table: str, has_state: bool) -> list[str]:
    """The source keys of ``table``'s rows still in quarantine: not landed, whatever the target holds."""
    if not has_state:
        return []
    rows = await tconn.fetch(
        "SELECT source_key FROM _sync.quarantine WHERE table_name = $1 AND resolved_at IS NULL", table
    )
    return [r["source_key"] for r in rows]


async def orphans(tconn: asyncpg.Connection, tp: TablePlan) -> int:
    """Target rows whose parent row is missing (a reference the copy left dangling)."""
    found = 0
    for link in tp.parents:
        present = " AND ".join(f"c.{ident(col)} IS NOT NULL" for col in link.columns)
        child = ", ".join(f"c.{ident(col)}" for col in link.columns)
        parent = ", ".join(f"p.{ident(col)}" for col in link.parent_columns)
        found += await tconn.fetchval(
            f"SELECT count(*) FROM {table_ident(tp.name)} AS c LEFT JOIN {table_ident(link.parent)} AS p "
            f"ON ({parent}) = ({child}) WHERE {present} AND p.{ident(link.parent_columns[0])} IS NULL"
        )
    return found
