"""The direct writer: staged batches into the target's ``auth.users`` and ``auth.identities`` by SQL.

One target transaction per batch: the batch is copied (binary COPY) into two temporary stage tables
(made once per connection, emptied at every commit; analysed only for the admin API's fix-ups, which join
them with ``auth.identities``), then set-based
statements (``direct_sql``) create, update and repair users, add identities, keep the id map and
resolve earlier quarantine records; a statement with no row of its kind in the batch is not sent. A
batch the database refuses is split in halves until the refused users are isolated and quarantined with
the database's message.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar
from uuid import UUID

import asyncpg

from sync.auth.columns import (
    DEFAULT_AUD,
    DEFAULT_ROLE,
    IDENTITIES_TABLE,
    IDENTITY_FIELDS,
    STAGED_FIELDS,
    USERS_TABLE,
    table_columns,
)
from sync.auth.direct_sql import (
    DROP_UNSOURCED_IDENTITIES,
    IDENTITY_KEY_INDEXED,
    INSERT_IDENTITIES,
    LAND_USERS,
    MAP_IDS,
    MISSING_USERS,
    QUARANTINE,
    REPAIR_EXPRESSIONS,
    RESOLVE_QUARANTINE,
    RESTORE_EXPRESSIONS,
    RESTORE_IDENTITIES,
    STAGE_IDENTITIES,
    STAGE_USER_FIELDS,
    STAGE_USERS,
    UNMAP_IDS,
    UPDATE_EXPRESSIONS,
    create_stage_sql,
    insert_users_sql,
    set_users_sql,
)
from sync.auth.match import MatchKind, UserMatch, normal_email, normal_phone
from sync.auth.options import AuthOptions, TriggerMode
from sync.auth.report import AuthReport, QuarantinedUser
from sync.connect import Endpoint, connect
from sync.errors import SyncError, UsageError
from sync.retry import is_transient_db_error, retrying
from sync.sqltext import Pending
from sync.state import WriteGuard

T = TypeVar("T")

# What a created user gets when production's row has no audience or role (as a signup would write).
_STAGED_DEFAULTS = {"aud": DEFAULT_AUD, "role": DEFAULT_ROLE}


class _MissingReference(Exception):
    """What the tool wrote refers to a user that is not there (checked when FK triggers are off)."""

    sqlstate = "23503"


REFUSALS = (asyncpg.PostgresError, _MissingReference)
"""What a write the target refuses raises (a transient one among them is retried first)."""


@dataclass(slots=True)
class StagedUser:
    """One source user on its way into a batch: the row, its identities, its match and the action."""

    row: asyncpg.Record
    identities: list[asyncpg.Record]
    match: UserMatch
    action: Literal["create", "update", "keep", "restore"]

    def routing(self) -> tuple[Any, ...]:
        """The stage row's routing fields: where the user goes, and with which e-mail and phone."""
        m = self.match
        return (
            self.row["id"],
            m.target_id,
            self.action,
            m.kind.value,
            normal_email(self.row["email"]) if m.keep_email else None,
            normal_phone(self.row["phone"]) if m.keep_phone else None,
        )

    def record(self) -> tuple[Any, ...]:
        """The whole stage row (``STAGE_USER_FIELDS``); a NULL or empty audience or role as the default."""
        row = self.row
        return (
            *self.routing(),
            *(row[name] or _STAGED_DEFAULTS.get(name, row[name]) for name, _ in STAGED_FIELDS),
        )


@dataclass
class BatchResult:
    """What one committed batch changed."""

    created: int = 0
    updated: set[UUID] = field(default_factory=set)
    identities: int = 0


class TargetWriter:
    """Writes staged batches into the target's auth tables: one transaction per batch, bisecting refusals.

    Only the ``auth.users`` columns this target's Auth version has are written, generated ones never.
    After a lost connection the writer reconnects (``conn`` may change).
    """

    def __init__(
        self,
        endpoint: Endpoint,
        conn: asyncpg.Connection,
        options: AuthOptions,
        run_id: int | None,
        report: AuthReport,
        guard: WriteGuard | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.guard = guard
        self.conn = conn
        self.options = options
        self.run_id = run_id
        self.report = report
        self._insert_users = ""
        # (statement, the action of the stage rows it updates)
        self._set_users: list[tuple[str, str]] = []
        self._restore_users = ""
        self._stage_users = create_stage_sql(STAGE_USERS, STAGE_USER_FIELDS)
        self._stage_identities = create_stage_sql(STAGE_IDENTITIES, IDENTITY_FIELDS)
        # The connection whose stage tables exist (created by a committed batch), and the one whose stage
        # tables have statistics (taken by a committed batch that restored users).
        self._staged_on: asyncpg.Connection | None = None
        self._analysed_on: asyncpg.Connection | None = None

    async def prepare(self) -> None:
        """Build the statements for the target's own ``auth.users`` columns."""
        columns = await table_columns(self.conn, USERS_TABLE, writable=True)
        identities = await table_columns(self.conn, IDENTITIES_TABLE)
        if "provider_id" not in identities or not await self.conn.fetchval(IDENTITY_KEY_INDEXED):
            raise UsageError(
                "The target's auth.identities has the shape of Auth servers before November 2023 (no "
                "provider_id, or no unique (provider_id, provider)): upgrade the target project's Auth first."
            )
        self._insert_users = insert_users_sql(columns)
        self._set_users = [
            (set_users_sql(UPDATE_EXPRESSIONS, columns), "update"),
            (set_users_sql(REPAIR_EXPRESSIONS, columns), "keep"),
        ]
        self._restore_users = set_users_sql(RESTORE_EXPRESSIONS, columns)

    def on(self, conn: asyncpg.Connection) -> TargetWriter:
        """A writer of the same import (statements, report, run lock) on another connection of the target,
        for transactions at once."""
        other = copy.copy(self)
        other.conn, other._staged_on, other._analysed_on = conn, None, None
        return other

    async def land(self, batch: Sequence[StagedUser]) -> None:
        """Write ``batch``; a refused batch is split until the refused users are isolated and quarantined."""
        if not batch:
            return
        try:
            result = await self._write_retrying(batch)
        except REFUSALS as exc:
            if is_transient_db_error(exc):
                raise
            if str(getattr(exc, "sqlstate", "")).startswith("42"):
                # A missing object, privilege or syntax: no user causes it, every user would be refused.
                raise SyncError(f"The target refused the auth import: {_message(exc)}") from exc
            if len(batch) == 1:
                await self.quarantine(batch[0].row, _message(exc), getattr(exc, "sqlstate", None))
                return
            half = len(batch) // 2
            await self.land(batch[:half])
            await self.land(batch[half:])
            return
        self._count(batch, result)

    def _count(self, batch: Sequence[StagedUser], result: BatchResult) -> None:
        report = self.report
        report.created += result.created
        report.identities_created += result.identities
        for user in batch:
            kind = user.match.kind
            if kind is MatchKind.NEW:
                continue
            if kind is MatchKind.ID:
                report.matched_by_id += 1
            elif kind is MatchKind.EMAIL:
                report.matched_by_email += 1
            else:
                report.matched_by_phone += 1
            if kind in (MatchKind.EMAIL, MatchKind.PHONE):
                report.mapped.append(user.match)
            if user.row["id"] in result.updated:
                report.updated += 1
            else:
                report.unchanged += 1

    async def _write_retrying(self, batch: Sequence[StagedUser]) -> BatchResult:
        async def stage(conn: asyncpg.Connection) -> bool:
            await conn.copy_records_to_table(
                STAGE_USERS,
                records=[u.record() for u in batch],
                columns=[n for n, _ in STAGE_USER_FIELDS],
            )
            # Read from the source in IDENTITY_FIELDS order: each record is its stage row as it is.
            identities = [i for u in batch for i in u.identities]
            if identities:
                await conn.copy_records_to_table(
                    STAGE_IDENTITIES, records=identities, columns=[n for n, _ in IDENTITY_FIELDS]
                )
            return bool(identities)

        return await self.write_staged(
            stage,
            {u.action for u in batch},
            {u.match.kind for u in batch},
            f"writing a batch of {len(batch)} auth user(s)",
        )

    async def write_staged(
        self,
        stage: Callable[[asyncpg.Connection], Awaitable[bool]],
        actions: set[str],
        kinds: set[MatchKind],
        what: str,
    ) -> BatchResult:
        """One transaction: ``stage`` fills the stage tables (True when it staged identities), then what
        they hold is written (users of these ``actions`` and match ``kinds``)."""
        result = await self.transaction(lambda conn: self._write(conn, stage, actions, kinds), what)
        self._staged_on = self.conn  # its stage tables exist now: the transaction that made them committed
        if "restore" in actions:
            self._analysed_on = self.conn
        return result

    async def transaction(self, work: Callable[[asyncpg.Connection], Awaitable[T]], what: str) -> T:
        """``work`` in one target transaction (the run lock checked, triggers skipped when so told),
        retried from the start after a transient error, on a new connection when the old one is lost."""

        async def attempt() -> T:
            if self.conn.is_closed():
                self.conn = await connect(self.endpoint)
            conn = self.conn
            async with conn.transaction():
                if self.guard is not None:
                    await self.guard(conn)
                if self.options.triggers is TriggerMode.SKIP:
                    # A literal SET LOCAL: hosted Supabase allows it to postgres only in this form.
                    await conn.execute("SET LOCAL session_replication_role = replica")
                return await work(conn)

        return await retrying(
            is_transient_db_error,
            attempts=self.options.retry_attempts,
            initial_wait=self.options.retry_initial_wait,
            max_wait=self.options.retry_max_wait,
            what=what,
        )(attempt)

    async def _write(
        self,
        conn: asyncpg.Connection,
        stage: Callable[[asyncpg.Connection], Awaitable[bool]],
        actions: set[str],
        kinds: set[MatchKind],
    ) -> BatchResult:
        result = BatchResult()
        fresh = self._staged_on is not conn
        if fresh:
            await conn.execute(f"{self._stage_users}; {self._stage_identities}")  # one round trip
        identities = await stage(conn)
        if "restore" in actions and self._analysed_on is not conn:
            # The admin API's fix-ups join the stage with auth.identities: planned with statistics, taken
            # once per connection. Every other statement probes the target's tables by index, whatever
            # the stage's statistics say, so no other batch waits for them.
            await conn.execute(f"ANALYZE {STAGE_USERS}, {STAGE_IDENTITIES}")
        if "create" in actions:
            result.created = _rowcount(await conn.execute(self._insert_users))
        for statement, action in self._set_users:
            if action in actions:
                result.updated.update(r["source_id"] for r in await conn.fetch(statement, action))
        if "restore" in actions:
            await conn.execute(self._restore_users, "restore")
        if identities:
            result.identities = _rowcount(await conn.execute(INSERT_IDENTITIES))
            if "restore" in actions:
                await conn.execute(RESTORE_IDENTITIES)
        if "restore" in actions:
            result.identities -= _rowcount(await conn.execute(DROP_UNSOURCED_IDENTITIES))
        # The id map, the ledger and the quarantine: no step waits for their results, one round trip.
        bookkeeping = Pending()
        if kinds & {MatchKind.EMAIL, MatchKind.PHONE}:
            await bookkeeping.execute(MAP_IDS, self.run_id, USERS_TABLE)
        await bookkeeping.execute(LAND_USERS, self.run_id, USERS_TABLE)
        await bookkeeping.execute(UNMAP_IDS, USERS_TABLE)
        await bookkeeping.execute(RESOLVE_QUARANTINE, USERS_TABLE)
        await bookkeeping.send(conn)
        if self.options.triggers is TriggerMode.SKIP:
            missing = await conn.fetch(MISSING_USERS)
            if missing:
                raise _MissingReference(
                    f"target user of production user {missing[0]['source_id']} is missing "
                    "(foreign keys are not checked while triggers are skipped)"
                )
        return result

    async def quarantine(self, row: Mapping[str, Any], error: str, sqlstate: str | None = None) -> None:
        """Record a source user that did not land (in its own transaction) and report it."""
        user_id = row["id"]
        self.report.quarantined += 1
        self.report.quarantine.append(QuarantinedUser(user_id, row.get("email"), error, sqlstate))
        async with self.conn.transaction():
            if self.guard is not None:
                await self.guard(self.conn)
            await self.conn.execute(
                QUARANTINE, self.run_id, USERS_TABLE, str(user_id), _row_json(row), error, sqlstate
            )


def _rowcount(status: str) -> int:
    """The row count of a command tag such as ``INSERT 0 12`` or ``UPDATE 3``."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _message(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    detail = getattr(exc, "detail", None)
    return f"{text} ({detail})" if detail else text


def _row_json(row: Mapping[str, Any]) -> str:
    """The source row for the quarantine, without the password hash (the target holds enough of those)."""
    data: dict[str, Any] = {}
    for key, value in dict(row).items():
        if key == "encrypted_password":
            continue
        if key in ("raw_app_meta_data", "raw_user_meta_data") and isinstance(value, str):
            value = json.loads(value)
        data[key] = value
    return json.dumps(data, default=str)
