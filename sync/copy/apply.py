"""Land a staged batch: foreign keys through the id map, the table's own keys, then the upsert.

Inside the batch's transaction, over the stage:

1. rewrite foreign keys through ``_sync.id_map`` (users matched by e-mail, remapped parents);
2. give the table's own rows their target keys (``remap``: a key taken in target by a different row
   gets a fresh key past production's keys, and the pair goes to the id map; ``natural``: adopt the
   key of the target row with the same natural key, and a row whose key another target row holds
   gets a fresh one too — never written over that row);
3. with triggers skipped (and so FK checks off), refuse rows whose parent is missing, as FKs would;
4. upsert per the table's policy, touching only copied columns and only rows that differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from sync.copy.ledger import recognise_landed, record_landed
from sync.copy.quarantine import RowRejected, resolve_landed
from sync.copy.stage import STAGE, staged_values
from sync.plan import Plan, TablePlan
from sync.selection import key_owners, links
from sync.sqltext import Pending, column_list, ident, row_of, table_ident


@dataclass
class Written:
    """Rows one committed transaction wrote."""

    inserted: int = 0
    updated: int = 0
    remapped: int = 0


async def apply_staged(
    conn: asyncpg.Connection,
    tp: TablePlan,
    plan: Plan,
    run_id: int,
    key_floor: int | None = None,
    *,
    ledger_fresh: bool = False,
    held: bool = True,
    pending: Pending | None = None,
) -> Written:
    """Steps 1–4 on the staged rows, inside the caller's transaction; staged rows in quarantine leave it.

    ``key_floor`` is where fresh keys for colliding rows start (past the source's highest key plus
    the plan's margin), for tables that allocate keys. ``ledger_fresh``: the ledger had no entry of the
    table when its copy began, so none of the staged rows (each copied once per run) is in it.
    ``held``: rows of the table may be in quarantine (False when the run knows none is: nothing to
    resolve). The statements whose results nothing waits for go together, in one round trip each
    group; the last group (the ledger) is left in ``pending`` when the caller gives one, to go with its
    own (the checkpoint).
    """
    written = Written()
    rewrites = Pending()
    if tp.trigger_mode == "skip":
        await rewrites.execute("SET LOCAL session_replication_role = replica")
    await rewrite_parents(rewrites, tp, plan)
    if tp.key == "remap" and len(tp.primary_key) == 1:
        await map_own_keys(rewrites, tp)
        if not ledger_fresh:
            await recognise_landed(rewrites, tp)
        await rewrites.send(conn)
        written.remapped = await remap_keys(conn, tp, run_id, key_floor)
    elif tp.key == "natural":
        await adopt_natural_keys(rewrites, tp, run_id)
        await rewrites.send(conn)
        written.remapped = await separate_natural_collisions(conn, tp, run_id, key_floor)
    await rewrites.send(conn)
    if tp.trigger_mode == "skip":
        await check_references(conn, tp)
    written.inserted, written.updated = await conn.fetchrow(upsert_sql(tp))
    landed = pending if pending is not None else Pending()
    await record_landed(landed, tp, run_id, fresh=ledger_fresh)
    if held:
        await resolve_landed(landed, tp.name)
    if pending is None:
        await landed.send(conn)
    return written


def staged_as_target(tp: TablePlan, columns: Sequence[str]) -> str:
    """``ROW(s.a::type, …)``: staged columns cast to the target's types, to compare with target rows."""
    types = tp.target_types
    return "ROW(" + ", ".join(f"s.{ident(c)}::{types[c]}" for c in columns) + ")"


async def rewrite_parents(conn: asyncpg.Connection | Pending, tp: TablePlan, plan: Plan) -> None:
    """Rewrite each single-column foreign key of the stage through the id map."""
    types = tp.staged_types
    for link in links(tp):
        if len(link.columns) != 1:
            continue
        col = link.columns[0]
        if col not in types:
            continue
        await conn.execute(
            f"UPDATE {STAGE} AS s SET {ident(col)} = m.target_key::{types[col]} FROM _sync.id_map AS m "
            f"WHERE m.table_name = ANY($1::text[]) AND m.source_key = s.{ident(col)}::text",
            key_owners(plan, link.parent),
        )


async def map_own_keys(conn: asyncpg.Connection | Pending, tp: TablePlan) -> None:
    """Rewrite staged keys that an earlier batch or run mapped (single-column keys)."""
    key = tp.primary_key[0]
    await conn.execute(
        f"UPDATE {STAGE} AS s SET {ident(key)} = m.target_key::{tp.staged_types[key]}, _mapped = true "
        f"FROM _sync.id_map AS m WHERE m.table_name = $1 AND m.source_key = s.{ident(key)}::text",
        tp.name,
    )


async def remap_keys(conn: asyncpg.Connection, tp: TablePlan, run_id: int, key_floor: int | None) -> int:
    """Give staged rows whose key a different target row holds a fresh key; return how many."""
    match_on = [c for c in tp.match_on if c in tp.target_types]
    if not match_on:
        return 0
    differs = f"{row_of(match_on, 't.')} IS DISTINCT FROM {staged_as_target(tp, match_on)}"
    return await give_fresh_keys(conn, tp, run_id, key_floor, differs)


async def give_fresh_keys(
    conn: asyncpg.Connection, tp: TablePlan, run_id: int, key_floor: int | None, differs: str
) -> int:
    """Staged rows not yet mapped whose key a target row holds and ``differs`` (over ``s`` and ``t``) get
    new keys, recorded in the id map so that their children follow; return how many.

    New keys come from the key's sequence (moved past ``key_floor`` before the copy) or, without one,
    from past both the table's highest key and ``key_floor``: out of the range production's own
    sequence fills next, so its next rows do not collide with these at the next catch-up.
    """
    key = tp.primary_key[0]
    target_key = f"{ident(key)}::{tp.target_types[key]}"
    sequence = tp.sequences.get(key)
    args: list[object] = [tp.name, run_id]
    if sequence:
        new_key = "nextval($3::regclass)"
        args.append(sequence)
    else:
        new_key = (
            f"GREATEST((SELECT max({ident(key)}) FROM {table_ident(tp.name)}), $3::bigint) "
            f"+ row_number() OVER ()"
        )
        args.append(key_floor or 0)
    return int(
        await conn.fetchval(
            f"WITH taken AS ("
            f"  SELECT s._source_key, s.{ident(key)}::text AS source_pk FROM {STAGE} AS s "
            f"  JOIN {table_ident(tp.name)} AS t ON t.{ident(key)} = s.{target_key} "
            f"  AND t.{ident(key)} = ANY({staged_values(f's.{target_key}', 'NOT s._mapped')}) "
            f"  WHERE NOT s._mapped AND {differs}"
            f"), fresh AS (SELECT _source_key, source_pk, {new_key} AS new_key FROM taken), "
            f"moved AS (UPDATE {STAGE} AS s SET {ident(key)} = fresh.new_key, _mapped = true FROM fresh "
            f"  WHERE s._source_key = fresh._source_key RETURNING fresh.source_pk, s.{ident(key)} AS k), "
            f"mapped AS (INSERT INTO _sync.id_map (table_name, source_key, target_key, reason, run_id) "
            f"  SELECT $1, source_pk, k::text, 'collision', $2 FROM moved "
            f"  ON CONFLICT (table_name, source_key) DO UPDATE SET target_key = EXCLUDED.target_key, "
            f"  reason = EXCLUDED.reason, run_id = EXCLUDED.run_id RETURNING 1) "
            f"SELECT count(*) FROM mapped",
            *args,
        )
    )


async def adopt_natural_keys(conn: asyncpg.Connection | Pending, tp: TablePlan, run_id: int) -> None:
    """Rewrite staged keys to those of target rows with the same natural key, recording the pairs.

    Without a copied primary key there is nothing to rewrite: the target numbers its own rows and the
    upsert matches on the natural key.
    """
    types = tp.staged_types
    pk = tp.primary_key
    if not pk or not all(k in types for k in pk):
        return
    natural = list(tp.natural)
    sets = ", ".join(f"{ident(k)} = p.{ident(f'_t_{k}')}::{types[k]}" for k in pk)
    targets = ", ".join(f"t.{ident(k)} AS {ident(f'_t_{k}')}" for k in pk)
    pairs = (
        f"SELECT s._source_key, {staged_key_text(pk)} AS source_pk, {targets}, "
        f"{key_text(pk, 't.')} AS target_pk FROM {STAGE} AS s JOIN {table_ident(tp.name)} AS t "
        f"ON {row_of(natural, 't.')} = {staged_as_target(tp, natural)}"
    )
    moved = (
        f"UPDATE {STAGE} AS s SET {sets}, _mapped = true FROM pairs AS p WHERE s._source_key = p._source_key"
    )
    if len(pk) != 1:
        await conn.execute(f"WITH pairs AS ({pairs}) {moved}")
        return
    # A single-column key adopted goes to the id map, so that rows pointing here follow it.
    await conn.execute(
        f"WITH pairs AS ({pairs}), moved AS ({moved}) "
        f"INSERT INTO _sync.id_map (table_name, source_key, target_key, reason, run_id) "
        f"SELECT $1, source_pk, target_pk, 'natural', $2 FROM pairs WHERE target_pk <> source_pk "
        f"ON CONFLICT (table_name, source_key) DO UPDATE SET target_key = EXCLUDED.target_key, "
        f"reason = EXCLUDED.reason, run_id = EXCLUDED.run_id",
        tp.name,
        run_id,
    )


async def separate_natural_collisions(
    conn: asyncpg.Connection, tp: TablePlan, run_id: int, key_floor: int | None
) -> int:
    """The collision check of a natural-key table: a staged row that matched no target row by its
    natural key but whose primary key a target row holds is another row, never written over it.

    A single integer key gets a fresh key (see :func:`give_fresh_keys`); any other key cannot be
    invented, so the row is refused and goes to quarantine with the reason.
    """
    types = tp.staged_types
    pk = tp.primary_key
    if not pk or not all(k in types for k in pk):
        return 0
    if tp.allocates_keys:
        return await give_fresh_keys(conn, tp, run_id, key_floor, "true")
    taken = await conn.fetchval(
        f"SELECT s._source_key FROM {STAGE} AS s JOIN {table_ident(tp.name)} AS t "
        f"ON {row_of(pk, 't.')} = {staged_as_target(tp, pk)} WHERE NOT s._mapped LIMIT 1"
    )
    if taken is not None:
        raise RowRejected(
            f"{tp.name}: key ({', '.join(pk)}) of the row with natural key {taken} is held in target by a "
            f"row with another natural key",
            "23505",
        )
    return 0


def staged_key_text(columns: Sequence[str]) -> str:
    """A staged row's key as the id map stores it (before any rewrite: the source's key)."""
    return key_text(columns, "s.")


def key_text(columns: Sequence[str], alias: str) -> str:
    """One text value for a key: the column's text, or a JSON array of the columns."""
    if len(columns) == 1:
        return f"{alias}{ident(columns[0])}::text"
    return f"jsonb_build_array({column_list(columns, alias)})::text"


async def check_references(conn: asyncpg.Connection, tp: TablePlan) -> None:
    """With FK triggers off (triggers = "skip"), refuse rows whose parent is missing, as FKs would."""
    deferred = set(tp.patched_later)
    for link in tp.parents:
        if link in deferred:
            continue
        present = " AND ".join(f"s.{ident(c)} IS NOT NULL" for c in link.columns)
        missing = await conn.fetchval(
            f"SELECT s._source_key FROM {STAGE} AS s WHERE {present} "
            f"AND NOT EXISTS (SELECT 1 FROM {table_ident(link.parent)} AS p "
            f"WHERE {row_of(link.parent_columns, 'p.')} = {row_of(link.columns, 's.')}) LIMIT 1"
        )
        if missing is not None:
            raise RowRejected(
                f"insert or update on table {tp.name} violates foreign key to {link.parent}: "
                f"the referenced row is missing",
                "23503",
            )


# Types without an equality operator: rows are compared on their text form.
NO_EQUALITY = frozenset({"json", "xml", "point", "line", "lseg", "box", "path", "polygon", "circle"})


def _comparable(columns: Sequence[str], types: dict[str, str], prefix: str) -> str:
    parts = [
        f"{prefix}{ident(c)}::text"
        if types.get(c, "").removesuffix("[]") in NO_EQUALITY
        else f"{prefix}{ident(c)}"
        for c in columns
    ]
    return f"ROW({', '.join(parts)})"


def upsert_sql(tp: TablePlan) -> str:
    """INSERT … SELECT … ON CONFLICT per the table's policy; returns (inserted, updated)."""
    deferred = {c for link in tp.patched_later for c in link.columns}
    target_cols, select_exprs = [], []
    for c in tp.columns:
        target_cols.append(c.target)
        if c.target in deferred:
            select_exprs.append("NULL")  # patched by the second pass, once both sides of the cycle landed
        elif c.source_type != c.target_type:
            select_exprs.append(f"s.{ident(c.target)}::{c.target_type}")
        else:
            select_exprs.append(f"s.{ident(c.target)}")
    for col, expr in tp.target_only.items():
        if expr is not None:
            target_cols.append(col)
            select_exprs.append(f"({expr})")  # a mapping default: an SQL expression by design
    # A natural-key table is matched on its natural key (its primary key, if any, is the target's).
    conflict_key = tp.row_key
    fixed = set(tp.primary_key) | set(conflict_key) | deferred
    updatable = [c.target for c in tp.columns if c.target not in fixed]
    if tp.policy == "target-wins" or not updatable:
        conflict = "DO NOTHING"
    else:
        types = tp.target_types
        before, after = _comparable(updatable, types, "t."), _comparable(updatable, types, "EXCLUDED.")
        changed = f"{before} IS DISTINCT FROM {after}"
        if tp.policy == "newest-wins" and "updated_at" in updatable:
            changed += ' AND EXCLUDED."updated_at" > t."updated_at"'
        sets = ", ".join(f"{ident(c)} = EXCLUDED.{ident(c)}" for c in updatable)
        conflict = f"DO UPDATE SET {sets} WHERE {changed}"
    # OVERRIDING SYSTEM VALUE keeps production's key in a GENERATED ALWAYS identity (a no-op elsewhere).
    insert = (
        f"INSERT INTO {table_ident(tp.name)} AS t ({column_list(target_cols)}) OVERRIDING SYSTEM VALUE "
        f"SELECT {', '.join(select_exprs)} FROM {STAGE} AS s"
    )
    arbiter = f"ON CONFLICT ({column_list(conflict_key)})"
    # Closure rows (out of the window, needed by a child) are only inserted when the target lacks them:
    # DO NOTHING probes the key's index per row (a NOT EXISTS beside the window's rows would be hashed
    # over the whole table, once per batch).
    return (
        f"WITH written AS ({insert} WHERE s._in_window {arbiter} {conflict} "
        f"RETURNING (xmax = 0) AS inserted), "
        f"needed AS ({insert} WHERE s._in_window IS NOT TRUE {arbiter} DO NOTHING "
        f"RETURNING true AS inserted) "
        f"SELECT count(*) FILTER (WHERE inserted)::int, count(*) FILTER (WHERE NOT inserted)::int "
        f"FROM (SELECT inserted FROM written UNION ALL SELECT inserted FROM needed) AS w"
    )
