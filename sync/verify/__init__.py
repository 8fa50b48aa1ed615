"""``sync verify``: the target holds production's users and rows, equal, or the report names each that is not.

Read-only on both sides (the source in one repeatable-read snapshot). For the auth users and for every
planned table, production's rows in scope (``--since``: the window; by default everything production
holds) are compared with the target's on the common columns, in the databases (see
:mod:`sync.compare`): rows in scope, equal, missing on the target, different (with the columns
that differ), only on the target though they came from production (production deletes), quarantined
(not landed, whatever the target holds under their key), and target rows whose parent is missing.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import asyncpg

from sync.compare import Comparison, Relation, bucket_count, compare, estimate_rows
from sync.connect import Endpoint, connect
from sync.errors import EXIT_DIFFERENT, EXIT_OK, UsageError
from sync.models import Model
from sync.plan import Plan, TablePlan
from sync.sqltext import Params, ident, table_ident
from sync.storage.check import StorageCheck, check_storage
from sync.storage.select import StorageRules
from sync.verify import tables, users
from sync.verify.logins import SignInCheck, check_sign_ins

SHOWN = 20
"""Keys listed per problem in the text output (``--json`` lists them all)."""


class Difference(Model):
    """A row on both sides whose values differ, and the columns that do."""

    key: str
    columns: list[str]


class Check(Model):
    """One table (or the auth users): production rows in scope and what became of each on the target."""

    table: str
    in_scope: int
    equal: int
    missing: list[str] = []
    different: list[Difference] = []
    production_deletes: list[str] = []
    quarantined: list[str] = []
    orphans: int = 0

    @property
    def ok(self) -> bool:
        return not (
            self.missing or self.different or self.production_deletes or self.quarantined or self.orphans
        )


class VerifyReport(Model):
    """``sync verify --json``: users first, then the tables parents first."""

    since: datetime | None
    users: Check | None
    tables: list[Check]
    files: StorageCheck | None = None
    """Set when the mapping names Storage objects: each copied row's file, by size and hash."""
    sign_ins: SignInCheck | None = None
    """Set when both sides have users: who can sign in with a password on production, and on the target."""

    @property
    def checks(self) -> list[Check]:
        return [*([self.users] if self.users else []), *self.tables]

    @property
    def ok(self) -> bool:
        return (
            all(c.ok for c in self.checks)
            and (self.files is None or self.files.ok)
            and (self.sign_ins is None or self.sign_ins.ok)
        )

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.ok else EXIT_DIFFERENT


async def verify(
    source: Endpoint,
    target: Endpoint,
    plan: Plan,
    since: datetime | None,
    storage: StorageRules | None = None,
) -> VerifyReport:
    """Compare the target with production (and the files ``storage`` names); writes nothing anywhere."""
    sconn = await connect(source, application_name="sync verify")
    try:
        tconn = await connect(target, application_name="sync verify")
        try:
            async with (
                sconn.transaction(isolation="repeatable_read", readonly=True),
                tconn.transaction(readonly=True),
            ):
                await _refuse_hidden_rows(sconn, [tp.source_name for tp in plan.tables])
                await tables.share_output_settings(sconn, tconn)
                state = await _state(tconn)
                checked_users = sign_ins = None
                if await _has_users(sconn) and await _has_users(tconn):
                    buckets = bucket_count(await estimate_rows(sconn, users.USERS_TABLE))
                    checked_users = await _check_users(sconn, tconn, state, buckets)
                    sign_ins = await check_sign_ins(
                        sconn, tconn, state.has_map, datetime.now(UTC), buckets=buckets
                    )
                # A path column the storage stage repoints (owner prefix through the id map) is checked
                # with the files, not as a value equal to production's.
                repointed = (
                    {(r.table, r.column) for r in storage.columns if r.owner_prefix} if storage else set()
                )
                checked = [
                    await _check_table(sconn, tconn, plan, _without(tp, repointed), since, state)
                    for tp in plan.tables
                ]
                files = await check_storage(sconn, tconn, storage, since) if storage else None
            return VerifyReport(
                since=since, users=checked_users, tables=checked, files=files, sign_ins=sign_ins
            )
        finally:
            await tconn.close()
    finally:
        await sconn.close()


_HIDDEN = """
SELECT x.name FROM unnest($1::text[]) AS x(name) JOIN pg_class AS c ON c.oid = to_regclass(x.name)
WHERE c.relrowsecurity AND (c.relforcerowsecurity OR NOT pg_has_role(c.relowner, 'USAGE'))
  AND NOT (SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user)
ORDER BY 1
"""


async def _refuse_hidden_rows(sconn: asyncpg.Connection, names: list[str]) -> None:
    """UsageError (exit 2) when row level security hides rows of a compared table from the source role.

    Compared to what such a role sees, a target would look equal while production rows are missing.
    """
    hidden = [r["name"] for r in await sconn.fetch(_HIDDEN, [*names, users.USERS_TABLE, "auth.identities"])]
    if hidden:
        user = await sconn.fetchval("SELECT current_user")
        raise UsageError(
            f"Row level security hides rows of {', '.join(hidden)} from the source role {user!r}, so "
            "nothing was compared: connect as the project's postgres role (it bypasses RLS)."
        )


def _without(tp: TablePlan, columns: set[tuple[str, str]]) -> TablePlan:
    """``tp`` without the named ``(table, column)`` pairs among its compared columns."""
    kept = [c for c in tp.columns if (tp.name, c.target) not in columns]
    return tp if len(kept) == len(tp.columns) else replace(tp, columns=kept)


class _State(Model):
    has_map: bool
    has_quarantine: bool
    has_ledger: bool
    copied_before: datetime | None
    """The first run's ``--since``: target rows dated before it came with the copy of production."""


async def _state(tconn: asyncpg.Connection) -> _State:
    row = await tconn.fetchrow(
        "SELECT to_regclass('_sync.id_map') IS NOT NULL AS has_map, "
        "to_regclass('_sync.quarantine') IS NOT NULL AS has_quarantine, "
        "to_regclass('_sync.landed') IS NOT NULL AS has_ledger, "
        "to_regclass('_sync.runs') IS NOT NULL AS has_runs"
    )
    copied_before = None
    if row["has_runs"]:
        copied_before = await tconn.fetchval(
            "SELECT since FROM _sync.runs WHERE since IS NOT NULL ORDER BY id LIMIT 1"
        )
    return _State(
        has_map=row["has_map"],
        has_quarantine=row["has_quarantine"],
        has_ledger=row["has_ledger"],
        copied_before=copied_before,
    )


async def _has_users(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval("SELECT to_regclass('auth.users') IS NOT NULL"))


async def _check_users(
    sconn: asyncpg.Connection, tconn: asyncpg.Connection, state: _State, buckets: int
) -> Check:
    found = await compare(
        sconn,
        tconn,
        users.source_users(),
        users.target_users(state.has_map),
        buckets=buckets,
        held=await tables.quarantined(tconn, users.USERS_TABLE, state.has_quarantine),
        matchers=users.MATCHERS,
    )
    deletes = await _production_deletes(sconn, tconn, users.USERS_TABLE, "id", "created_at", found, state)
    return _check(users.USERS_TABLE, found, deletes, 0)


async def _check_table(
    sconn: asyncpg.Connection,
    tconn: asyncpg.Connection,
    plan: Plan,
    tp: TablePlan,
    since: datetime | None,
    state: _State,
) -> Check:
    castable = await tables.source_casts(sconn, tp)
    found = await compare(
        sconn,
        tconn,
        tables.source_relation(plan, tp, since, castable),
        tables.target_relation(plan, tp, since, state.has_map),
        buckets=bucket_count(await estimate_rows(sconn, tp.source_name)),
        held=await tables.quarantined(tconn, tp.name, state.has_quarantine),
    )
    deletes: list[str] = []
    if found.only_on_target and len(tp.row_key) == 1:
        dated = next((c.target for c in tp.columns if c.target in ("created_at", tp.since)), None)
        deletes = await _production_deletes(
            sconn, tconn, tp.name, tp.row_key[0], dated, found, state, source_table=tp.source_name
        )
    return _check(tp.name, found, deletes, await tables.orphans(tconn, tp))


def _check(table: str, found: Comparison, deletes: list[str], orphans: int) -> Check:
    problems = len(found.missing) + len(found.different) + len(found.held)
    return Check(
        table=table,
        in_scope=found.in_scope,
        equal=found.in_scope - problems,
        missing=found.missing,
        different=[Difference(key=k, columns=c) for k, c in sorted(found.different.items())],
        production_deletes=deletes,
        quarantined=found.held,
        orphans=orphans,
    )


async def _production_deletes(
    sconn: asyncpg.Connection,
    tconn: asyncpg.Connection,
    table: str,
    key: str,
    dated: str | None,
    found: Comparison,
    state: _State,
    *,
    source_table: str | None = None,
) -> list[str]:
    """The target-only keys (production's key space) that came from production and production lacks.

    A row came from production when a run landed it (the ledger, or the id map), or when it is dated
    before the first run's ``--since`` (it came with the copy). Development's own rows never count.
    """
    candidates = [k for k in found.only_on_target if not k.startswith("!")]
    if not candidates:
        return []
    present = await sconn.fetch(
        f"SELECT {ident(key)}::text AS k FROM {table_ident(source_table or table)} "
        f"WHERE {ident(key)}::text = ANY($1::text[])",
        candidates,
    )
    gone = sorted(set(candidates) - {r["k"] for r in present})
    if not gone:
        return []
    params = Params()
    name, keys = params.bind(table, "text"), params.bind(gone, "text[]")
    proofs = [
        f"SELECT source_key FROM _sync.{ledger} WHERE table_name = {name} AND source_key = ANY({keys})"
        for ledger, present in (("landed", state.has_ledger), ("id_map", state.has_map))
        if present
    ]
    if dated is not None and state.copied_before is not None:
        proofs.append(
            f"SELECT t.{ident(key)}::text FROM {table_ident(table)} AS t WHERE t.{ident(key)}::text = "
            f"ANY({keys}) AND t.{ident(dated)} < {params.bind(state.copied_before, 'timestamptz')}"
        )
    if not proofs:
        return []
    rows = await tconn.fetch(" UNION ".join(proofs), *params.values)
    return sorted({r[0] for r in rows})


__all__ = ["Check", "Difference", "Relation", "SignInCheck", "VerifyReport", "verify"]
