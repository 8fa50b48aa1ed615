"""Auth import: every production user exists on the target and signs in there with the same password.

``import_users`` (here) runs it; the package's modules, in the order a run meets them:
``options`` (modes, policy, options), ``preflight`` (privileges, the trigger-skip check), ``source``
(reading production's users and identities), ``match`` (keys, normalisers and the one matcher, which
``sync plan`` uses too), ``settle`` (the direct mode's keys staged on the target, the users SQL settles),
``importer`` (one import's flow, batch by batch), ``direct`` and ``direct_sql`` (the SQL writer),
``direct_copy`` (settled new users by COPY from production), ``admin_api``, ``admin_api_user`` and
``admin_api_errors`` (the admin-API path), ``report`` (the report and per-user notes), ``columns`` (the
auth tables' columns).

Source users are matched against target users, then the missing ones are created and the matched ones
brought up to date, before any table row that references a user is copied.

Matching, in this order (emails compared as ``lower(trim(email))``, phones as digits without ``+``):

1. **Same id** — the user is present. Under ``source-wins`` (the default) its password hash, metadata,
   confirmation and sign-in times, ban, deletion and anonymity follow production; its e-mail and phone
   too, unless another user holds them (then the target's own are kept and a note says so).
   ``target-wins`` leaves matched users' values as they are. Under either policy a NULL the Auth server
   cannot read (an old import's NULL token, say) is repaired on every matched user: such a user cannot
   sign in at all.
2. **The id map** — a source user mapped by an earlier run keeps its target user.
3. **Same e-mail, then same phone, other id** — the person signed up again on the target. The source
   id maps to the target id in ``_sync.id_map`` (reason ``email``/``phone``) so that every row that
   references the user follows it, and the target user takes production's password hash, confirmation
   times and metadata (``source-wins``): the production password is the one the person knows. A source
   user without a hash (Google-only in production) leaves the target's hash alone; a confirmation time
   is never cleared.
4. **Otherwise created**, with its production id.

Special users:

- **Deleted** (``deleted_at`` set): matched by id only — a deleted account never takes over a live one
  by its address. Created with ``deleted_at`` kept so that production rows referencing it still land;
  when its e-mail or phone now belongs to a target user, it is created without them (noted).
- **Banned**: copied as any other user; ``banned_until`` is kept, so the ban holds on the target.
- **Anonymous**: they have neither e-mail nor phone, so they match by id only; created with
  ``is_anonymous`` kept (it becomes the JWT claim RLS policies test).
- **SSO** (``is_sso_user``): matched by id only, as the Auth server never finds them by e-mail; created
  with their ``sso:…`` identities. They sign in only if the target has the same SSO provider (noted;
  ``auth.sso_providers`` is project configuration and is not copied).
- **Two source users on one target user** (same address in different case, or one address on two
  accounts): a target user is matched by at most one source user. The earlier-created source user wins
  (a same-id match always wins); the other is quarantined with the reason, and so is a new user whose
  e-mail or phone was already taken by an earlier one in the same run.

Written as the Auth server needs it (``reference/supabase-auth.md`` §5): nil-UUID ``instance_id``,
``aud``/``role`` from the source or ``authenticated``, lower-cased e-mail, phone NULL rather than
``''``, ``''`` in the ten columns the server scans as strings (pending tokens are not carried, and their
``*_sent_at`` are NULL), ``email_change_confirm_status`` 0, non-NULL ``created_at``/``updated_at``,
generated columns never named. Every source identity is copied (OAuth ones with their ``provider_id``
and ``identity_data``; e-mail and phone ones re-derived to the target id when remapped; e-mail lower-cased
in ``identity_data``), skipping a (provider_id, provider) the target already has; a user gets exactly
the identities production has (a Google-only user no e-mail identity). MFA factors, sessions, refresh
tokens and one-time tokens are not copied: users sign in again, and MFA users enrol again
(``include_mfa`` is not available yet).

Two modes:

- ``direct``: matching starts on the target (``settle``): production's keys are staged there with one
  binary COPY, and the users no rule can touch (addresses in normal form that no other user on either
  side has, no mapping) are settled in SQL; only the rest are given to the matcher, so memory stays flat.
  The settled new users are created by COPY straight from production (``direct_copy``), many thousands
  per transaction, and the settled same-id matches are staged the same way, up to ``jobs`` groups at once;
  every other user goes in set-based batches in one target transaction each — the batch
  is staged with binary COPY into temporary tables, then ``INSERT … SELECT`` / ``UPDATE … FROM`` into
  ``auth.users`` and ``auth.identities``, the id map and the quarantine. A COPY group the target refuses
  goes through the batches. A batch the database refuses (a trigger that
  raises, a constraint) is split in halves until the refused users are isolated; they go to
  ``_sync.quarantine`` with the database's message and the rest lands. Triggers on ``auth.users`` fire
  (the signup trigger makes a ``profiles`` row, which the copy stage completes) unless ``triggers =
  "skip"``, which runs each batch under ``SET LOCAL session_replication_role = replica`` and then
  checks the references of what it wrote itself, as foreign keys are not checked then.
- ``admin-api``: each missing user is created through the Auth admin API (the ``supabase`` client) with
  its id, e-mail/phone, password hash, confirmation flags and metadata; bounded concurrency, retries
  with backoff for 429/5xx/timeouts, a lookup by id before every retry (a timeout may hide a create that
  landed); an "e-mail exists" answer is resolved by finding the holder and mapping to it (or
  quarantining the user when only another user's identity carries the address). What the API cannot
  carry (original timestamps, confirmation times, OAuth identities, the exact ban, ``deleted_at``) and
  the users it cannot create (anonymous, SSO, soft-deleted with scrambled contacts, an e-mail or phone
  the server's format checks refuse, a body over its 1 MiB cap, an unsupported hash) are written
  directly when a target DSN is also given, else reported per user; so is a user whose create keeps
  failing with a 500, whose cause (often a trigger) the API hides: the direct write lands it or
  quarantines it with the database's message. Without a target DSN nothing is written but through the
  API (no id map, no quarantine table: the report carries both).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING
from uuid import UUID

import asyncpg

from sync.auth.admin_api_user import create_attributes
from sync.auth.columns import STRING_COLUMNS, USERS_TABLE
from sync.auth.direct import TargetWriter
from sync.auth.direct_copy import Readers
from sync.auth.importer import UserImport, UserProgress
from sync.auth.match import DeletedAccounts, MatchKind, SourceKey, TargetKey, UserMatch, match_users
from sync.auth.options import AdminApi, AuthMode, AuthOptions, TriggerMode
from sync.auth.preflight import SOURCE_PRIVILEGES, TARGET_PRIVILEGES, check_privileges, check_trigger_skip
from sync.auth.report import AuthReport
from sync.auth.settle import StoredOtherwise
from sync.connect import Endpoint, both, connect, open_all
from sync.errors import UsageError
from sync.lazy import lazy_names
from sync.selection import Changes
from sync.snapshot import SourceSnapshot as RunSnapshot
from sync.state import WriteGuard, ensure_state

if TYPE_CHECKING:
    from sync.auth.admin_api import AdminApiCreator, HashLookup, HolderLookup, check_admin_api
    from sync.auth.admin_api_errors import is_transient_api_error, retry_after

__all__ = [
    "STRING_COLUMNS",
    "AdminApi",
    "AdminApiCreator",
    "AuthOptions",
    "AuthReport",
    "MatchKind",
    "SourceKey",
    "TargetKey",
    "UserMatch",
    "UserProgress",
    "check_admin_api",
    "create_attributes",
    "import_users",
    "is_transient_api_error",
    "match_users",
    "retry_after",
]


async def import_users(
    source: Endpoint,
    target: Endpoint | None,
    options: AuthOptions | None = None,
    *,
    admin_api: AdminApi | None = None,
    run_id: int | None = None,
    changed_since: datetime | None = None,
    snapshot: RunSnapshot | None = None,
    only_ids: Sequence[UUID] | None = None,
    guard: WriteGuard | None = None,
    changes: Changes | None = None,
    deleted_accounts: DeletedAccounts = (),
    progress: UserProgress | None = None,
    odd_target: asyncio.Future[StoredOtherwise] | None = None,
) -> AuthReport:
    """Bring every source auth user onto the target (rules in the package docstring); return the report.

    ``changed_since`` limits a catch-up to the users created, changed or signed in since then (every
    other user was brought over by an earlier run); ``only_ids`` to these users (a quarantine retry).
    ``snapshot`` is the run's exported source snapshot: the users are read inside it, at the same
    instant as the table rows. Without it the import reads a snapshot of its own. ``guard`` runs in
    every write transaction before it commits (the run lock's check). ``changes`` adds the users whose
    row or identities a transaction wrote since the previous run's snapshot, whatever their clock
    columns say. ``deleted_accounts``: target users whose production account was deleted; no one else
    is matched to them (a person who signed up again is a new user, held back while the old account is
    there); or the search that will know them, waited for before any target user is read.
    ``progress`` hears of the users ahead and of each batch as it lands. ``odd_target``: the target's users
    stored otherwise, being read ahead (:func:`~sync.auth.settle.stored_otherwise_ahead`).

    ``direct`` needs ``target``. ``admin-api`` needs ``admin_api`` and, when ``target`` is given too,
    writes there what the API cannot carry, the id map and the quarantine. Raises UsageError before
    writing anything when an option or a privilege is missing.
    """
    options = options or AuthOptions()
    _check_options(options, target, admin_api)
    started = time.monotonic()
    report = AuthReport(mode=options.mode, policy=options.policy, triggers=options.triggers)
    if changes is not None and USERS_TABLE in changes.quiet and only_ids is None:
        return report  # the run's census found no user to read: nothing to connect for
    async with contextlib.AsyncExitStack() as stack:
        api: AdminApiCreator | None = None
        if admin_api is not None and options.mode is AuthMode.ADMIN_API:
            # Imported here: the supabase client is loaded only when this mode is used (see __getattr__).
            from sync.auth.admin_api import AdminApiCreator

            api = await stack.enter_async_context(AdminApiCreator(admin_api, options, {}))
            await api.check_credentials()  # before anything is written
        opened = await open_all(
            snapshot.reader() if snapshot is not None else connect(source),
            *([connect(target)] if target is not None else []),
        )
        source_conn = opened[0]
        if snapshot is not None:
            stack.push_async_exit(_handed_on(snapshot, source_conn))
        else:
            stack.push_async_callback(source_conn.close)
        for conn in opened[1:]:
            stack.push_async_callback(conn.close)
        writer: TargetWriter | None = None
        if target is not None:
            target_conn = opened[1]
            writer = TargetWriter(target, target_conn, options, run_id, report, guard)

        async def ready_target() -> None:
            """The target's checks and the writer's preparation (beside the source's check)."""
            if writer is None:
                return
            hint = ", or use --auth-mode admin-api" if options.mode is AuthMode.DIRECT else ""
            await check_privileges(writer.conn, "target", TARGET_PRIVILEGES, hint)
            if options.triggers is TriggerMode.SKIP:
                await check_trigger_skip(writer.conn)
            await ensure_state(writer.conn)
            await writer.prepare()

        await both(check_privileges(source_conn, "source", SOURCE_PRIVILEGES), ready_target())
        run = UserImport(
            options,
            report,
            writer,
            changed_since,
            only_ids,
            changes,
            deleted_accounts,
            progress,
            _readers(snapshot),
            odd_target,
        )
        if api is not None:
            api.claimed = run.claimed
            if writer is not None:
                api.find_holder, api.stored_hash = _database_lookups(writer)
            run.api = api
        await run.run(source_conn)
    report.seconds = round(time.monotonic() - started, 3)
    return report


def _handed_on(snapshot: RunSnapshot, reader: asyncpg.Connection) -> Callable[..., Awaitable[bool]]:
    """The import's exit for its reader: given back to the run when the import ended cleanly (the
    table passes read on in the same snapshot), closed otherwise."""

    async def leave(exc_type: type[BaseException] | None, *_: object) -> bool:
        if exc_type is None:
            snapshot.give_back(reader)
        else:
            reader.terminate()
        return False

    return leave


def _readers(snapshot: RunSnapshot | None) -> Readers | None:
    """More source readers in the run's snapshot, while it is there to join (none without one: users
    created at once must be read at the same instant)."""
    if snapshot is None or not snapshot.shared:
        return None

    async def reader() -> asyncpg.Connection | None:
        conn = await snapshot.reader()
        if snapshot.shared:
            return conn
        await conn.close()  # it could not join: a fresh snapshot would read another instant
        return None

    return reader


def _check_options(options: AuthOptions, target: Endpoint | None, admin_api: AdminApi | None) -> None:
    if options.include_mfa:
        raise UsageError("Copying MFA factors (include_mfa) is not available yet: leave it off.")
    if options.mode is AuthMode.DIRECT and target is None:
        raise UsageError("The direct auth mode needs the target database (--target).")
    if options.mode is AuthMode.ADMIN_API and admin_api is None:
        raise UsageError(
            "The admin-api auth mode needs the project URL and the service-role key "
            "(--supabase-url and --service-role-key, or SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY)."
        )


def _database_lookups(writer: TargetWriter) -> tuple[HolderLookup, HashLookup]:
    """Who holds an e-mail/phone, and the hash stored for a user, asked of the target database (one query
    at a time on its connection)."""
    lock = asyncio.Lock()

    async def holder(kind: str, value: str) -> UUID | None:
        async with lock:
            if kind == "email":
                return await writer.conn.fetchval(
                    "SELECT id FROM auth.users WHERE lower(email) = $1 AND NOT is_sso_user "
                    "ORDER BY email = $1 DESC, created_at LIMIT 1",
                    value,
                )
            return await writer.conn.fetchval(
                "SELECT id FROM auth.users WHERE phone = $1 AND NOT is_sso_user ORDER BY created_at LIMIT 1",
                value,
            )

    async def stored_hash(user_id: UUID) -> str | None:
        async with lock:
            return await writer.conn.fetchval(
                "SELECT encrypted_password FROM auth.users WHERE id = $1", user_id
            )

    return holder, stored_hash


# The admin API's client (the ``supabase`` package) is a third of the tool's start-up: it is imported when
# the admin-api mode is used, not by every command.
_LAZY = {
    "AdminApiCreator": "sync.auth.admin_api",
    "check_admin_api": "sync.auth.admin_api",
    "is_transient_api_error": "sync.auth.admin_api_errors",
    "retry_after": "sync.auth.admin_api_errors",
}


__getattr__ = lazy_names(__name__, _LAZY)
