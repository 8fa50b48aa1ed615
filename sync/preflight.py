"""Before anything is written: both sides reachable, different, shaped and privileged for the run.

``sync plan``, ``sync run`` and ``sync verify`` call :func:`preflight` with what they will do (a
:class:`Needs`); every refusal is one :class:`PreflightError` line (exit 2) raised before the tool has
created or changed anything on either side. The checks only read catalogs and settings.

- **Source ≠ target**: the same server (``system_identifier`` where the role may read
  ``pg_control_system()``, else the postmaster's start time, else host and port) and the same database.
- **Shape**: the ``auth`` schema where the auth stage runs; none on either side is plain PostgreSQL
  (users are left out), on one side only is a refusal naming the side.
- **Privileges**: the target is writable (not read-only, not a standby), the role may create ``_sync``
  (or it exists and is the role's), may read, insert and update every table the run writes, and may
  use and set every sequence the run moves (``USAGE, UPDATE``: ``setval`` and fresh keys); the source
  role may read every table the run reads and row level security hides none of its rows.
- **More checks** (e.g. that an admin API answers with its key) plug in through ``Needs.extra``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import asyncpg

from sync.connect import Endpoint, PoolMode, both, connect_both, detect_pool_mode
from sync.copy.sequences import sequences_set
from sync.errors import UsageError
from sync.plan import AUTH_USERS, Plan

AUTH_IDENTITIES = "auth.identities"
STATE_SCHEMA = "_sync"
NO_AUTH_NOTE = "no auth schema on either side: users are not part of this sync"

Check = Callable[[], Awaitable[None]]
"""An extra preflight check: raises PreflightError (one line) when the run cannot go ahead."""


class PreflightError(UsageError):
    """The run would fail or harm something; nothing has been written anywhere."""


class AuthScope(StrEnum):
    """Where the auth schema is: both sides (users are synced) or neither (plain PostgreSQL)."""

    BOTH = "both"
    NEITHER = "neither"


@dataclass(frozen=True)
class Needs:
    """What the command will do, so the preflight checks exactly that."""

    writes: bool = True
    """The command writes the target (``run``); ``plan`` and ``verify`` only read."""
    auth: bool = True
    """The auth stage runs (not ``--skip-auth``)."""
    extra: Sequence[Check] = ()


@dataclass(frozen=True)
class Server:
    """What one side says about itself: who is connected where, and what the role may do."""

    user: str
    database: str
    version: str
    system_identifier: int | None
    started: str
    host_port: str
    read_only: bool
    in_recovery: bool
    bypass_rls: bool
    can_create: bool
    has_auth: bool
    state_usable: bool | None
    """``_sync`` exists and the role may use it (None: it does not exist yet)."""
    pool_mode: PoolMode = PoolMode.DIRECT

    @property
    def identity(self) -> str:
        """Names this database across runs: the server's system identifier, else its address, and the name."""
        server = f"system {self.system_identifier}" if self.system_identifier is not None else self.host_port
        return f"{server}/{self.database}"

    def describe(self, endpoint: Endpoint) -> str:
        """``user@host:port/db (PostgreSQL 18.1, direct)`` — never a password."""
        return f"{endpoint} (PostgreSQL {self.version}, {self.pool_mode})"


@dataclass(frozen=True)
class Preflight:
    """What the checks found: both sides, and whether users take part."""

    source: Server
    target: Server
    auth: AuthScope
    notes: list[str] = field(default_factory=list)

    @property
    def source_identity(self) -> str:
        return self.source.identity


_SERVER = """
SELECT current_user AS "user", current_database() AS database,
       current_setting('server_version') AS version,
       pg_postmaster_start_time()::text AS started,
       coalesce(inet_server_addr()::text, '') || ':' || coalesce(inet_server_port()::text, '') AS host_port,
       current_setting('transaction_read_only') = 'on' AS read_only,
       pg_is_in_recovery() AS in_recovery,
       (SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user) AS bypass_rls,
       has_database_privilege(current_database(), 'CREATE') AS can_create,
       to_regclass('auth.users') IS NOT NULL AS has_auth,
       CASE WHEN to_regnamespace('_sync') IS NULL THEN NULL
            ELSE has_schema_privilege('_sync', 'USAGE') END AS state_usable,
       has_function_privilege('pg_control_system()', 'EXECUTE') AS sees_control
"""


async def read_server(conn: asyncpg.Connection, endpoint: Endpoint) -> Server:
    """What ``conn``'s server and role are, read from settings and catalogs only."""
    row = dict(await conn.fetchrow(_SERVER))
    system_identifier = None
    if row.pop("sees_control"):
        system_identifier = await conn.fetchval("SELECT system_identifier FROM pg_control_system()")
    return Server(**row, system_identifier=system_identifier, pool_mode=endpoint.mode)


def same_database(source: Server, target: Server, source_at: Endpoint, target_at: Endpoint) -> bool:
    """Whether both endpoints reach one database, however differently their URLs spell it."""
    if source.database != target.database:
        return False
    if source.system_identifier is not None and target.system_identifier is not None:
        # A physical copy keeps the identifier but is started on its own: the start time tells them apart.
        return source.system_identifier == target.system_identifier and source.started == target.started
    if source.started == target.started:
        return True
    address = ("host", "port")
    return all(source_at.params.get(k) == target_at.params.get(k) for k in address)


async def reach(source: Endpoint, target: Endpoint) -> tuple[Endpoint, Endpoint]:
    """Both endpoints, each with the pool mode its connections show (a pooler is known by behaviour)."""
    return await both(detect_pool_mode(source), detect_pool_mode(target))


async def preflight(
    source: Endpoint,
    target: Endpoint,
    plan: Plan,
    needs: Needs,
    on: tuple[asyncpg.Connection, asyncpg.Connection] | None = None,
) -> Preflight:
    """Check both sides for what ``needs`` says the command does; PreflightError (exit 2) when refused.

    ``on``: the command's own connections to (source, target), used and left open, rather than a pair
    opened for the checks (one connection's wait less, a TLS handshake and more on a remote server).
    """
    sconn, tconn = on or await connect_both(source, target, application_name="sync preflight")
    try:
        src, tgt = await both(read_server(sconn, source), read_server(tconn, target))
        if same_database(src, tgt, source, target):
            raise PreflightError(
                f"--source and --target are the same database ({target}, {tgt.identity}): "
                "the source must be production and the target another database."
            )
        scope = _auth_scope(src, tgt, needs)
        users = needs.auth and scope is AuthScope.BOTH

        async def check_target() -> None:
            if needs.writes:
                _check_lockable(target)
                _check_writable(tgt)
                await _check_target(tconn, tgt, plan, users)

        # Both sides at once; a refusal of the source's is the one said, as when they were checked in turn.
        await both(_check_source(sconn, src, plan, users), check_target())
    finally:
        if on is None:
            await both(tconn.close(), sconn.close())
    for check in needs.extra:
        await check()
    notes = [NO_AUTH_NOTE] if needs.auth and scope is AuthScope.NEITHER else []
    return Preflight(src, tgt, scope, notes)


def _auth_scope(source: Server, target: Server, needs: Needs) -> AuthScope:
    if source.has_auth and target.has_auth:
        return AuthScope.BOTH
    if not source.has_auth and not target.has_auth:
        return AuthScope.NEITHER
    if not needs.auth:
        return AuthScope.NEITHER
    lacking, other = ("source", "target") if not source.has_auth else ("target", "source")
    raise PreflightError(
        f"The {lacking} database has no auth schema (auth.users) but the {other} has: users cannot be "
        "synced; pass --skip-auth to copy table rows only, or point --"
        f"{lacking} at the Supabase project's database."
    )


def _check_lockable(target: Endpoint) -> None:
    if target.mode is PoolMode.TRANSACTION:
        raise PreflightError(
            f"The target {target} goes through a transaction-mode pooler, which cannot hold the run lock: "
            "use the pooler's session port (5432 on Supabase) or the direct URL for --target."
        )


def _check_writable(target: Server) -> None:
    if target.in_recovery:
        raise PreflightError(
            "The target database is a read-only standby (in recovery): point --target at the primary."
        )
    if target.read_only:
        raise PreflightError(
            f"The target database is read-only for role {target.user!r} (default_transaction_read_only "
            f"is on): ALTER ROLE {target.user} SET default_transaction_read_only = off, or use another role."
        )
    if target.state_usable is None and not target.can_create:
        raise PreflightError(
            f"The target role {target.user!r} may not create the schema {STATE_SCHEMA} where the tool "
            f"keeps its state: GRANT CREATE ON DATABASE {target.database} TO {target.user}."
        )
    if target.state_usable is False:
        raise PreflightError(
            f"The target role {target.user!r} may not use the schema {STATE_SCHEMA}: "
            f"GRANT USAGE ON SCHEMA {STATE_SCHEMA} TO {target.user}, or connect as its owner."
        )


_PRIVILEGES = """
SELECT x.name, x.privilege,
       has_table_privilege(c.oid, x.privilege) AS granted,
       c.relrowsecurity AND (c.relforcerowsecurity OR NOT pg_has_role(c.relowner, 'USAGE')) AS rls
FROM unnest($1::text[], $2::text[]) AS x(name, privilege)
JOIN pg_class AS c ON c.oid = to_regclass(x.name)
ORDER BY x.name, x.privilege
"""


# ``setval`` needs UPDATE; reading the sequence's position and drawing fresh keys need USAGE.
_SEQUENCE_PRIVILEGES = """
SELECT x.name, p.privilege
FROM unnest($1::text[]) AS x(name), unnest(ARRAY['USAGE', 'UPDATE']) WITH ORDINALITY AS p(privilege, i)
WHERE NOT has_sequence_privilege(x.name, p.privilege)
ORDER BY x.name, p.i
"""


async def _lacking(
    conn: asyncpg.Connection, server: Server, needed: Sequence[tuple[str, str]]
) -> tuple[list[str], list[str]]:
    """The ``privilege on table`` pairs the role lacks, and the tables row level security limits it on."""
    rows = await conn.fetch(_PRIVILEGES, [n for n, _ in needed], [p for _, p in needed])
    lacking = [f"{r['privilege']} ON {r['name']}" for r in rows if not r["granted"]]
    limited = sorted({r["name"] for r in rows if r["rls"] and not server.bypass_rls})
    return lacking, limited


async def _lacking_on_sequences(conn: asyncpg.Connection, plan: Plan) -> list[str]:
    """The ``privilege ON SEQUENCE name`` pairs the role lacks on the sequences the run moves."""
    names = sorted({sequence for _, _, sequence in sequences_set(plan)})
    rows = await conn.fetch(_SEQUENCE_PRIVILEGES, names) if names else []
    return [f"{r['privilege']} ON SEQUENCE {r['name']}" for r in rows]


def _grant_line(side: str, server: Server, lacking: list[str]) -> str:
    by_table: dict[str, list[str]] = {}
    for item in lacking:
        privilege, table = item.split(" ON ", 1)
        by_table.setdefault(table, []).append(privilege)
    grants = "; ".join(f"GRANT {', '.join(p)} ON {t} TO {server.user}" for t, p in by_table.items())
    return f"The {side} role {server.user!r} lacks privileges the run needs: {grants}."


async def _check_source(conn: asyncpg.Connection, source: Server, plan: Plan, users: bool) -> None:
    tables = [t.source_name for t in plan.tables] + ([AUTH_USERS, AUTH_IDENTITIES] if users else [])
    lacking, limited = await _lacking(conn, source, [(t, "SELECT") for t in tables])
    if lacking:
        raise PreflightError(_grant_line("source", source, lacking))
    if limited:
        raise PreflightError(
            f"Row level security hides rows of {', '.join(limited)} from the source role {source.user!r} "
            f"(it neither owns them nor bypasses RLS): connect as the project's postgres role, or "
            f"ALTER ROLE {source.user} BYPASSRLS."
        )


async def _check_target(conn: asyncpg.Connection, target: Server, plan: Plan, users: bool) -> None:
    tables = [t.name for t in plan.tables] + ([AUTH_USERS, AUTH_IDENTITIES] if users else [])
    needed = [(t, p) for t in tables for p in ("SELECT", "INSERT", "UPDATE")]
    lacking, limited = await _lacking(conn, target, needed)
    lacking += await _lacking_on_sequences(conn, plan)
    if lacking:
        hint = (
            " (or use --auth-mode admin-api for the users)" if users and "auth." in " ".join(lacking) else ""
        )
        raise PreflightError(_grant_line("target", target, lacking)[:-1] + f"{hint}.")
    if limited:
        raise PreflightError(
            f"Row level security limits what the target role {target.user!r} may write to "
            f"{', '.join(limited)}: connect as the project's postgres role, or ALTER ROLE {target.user} "
            "BYPASSRLS."
        )
