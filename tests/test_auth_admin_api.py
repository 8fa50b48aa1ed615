"""Auth import, admin-API mode: users created through the Auth admin endpoints, retried safely.

The endpoints are served by the local stand-in (``admin_api_server``) over real HTTP, writing into the
target database as the Auth server would; it can answer 429/5xx, time out, or commit then hide the
answer. The story checks are shared with the direct-mode tests.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import bcrypt
import httpx
import psycopg
import psycopg.sql
import pytest
from admin_api_import import FAST, FirstApiImport, run_api
from admin_api_server import FAULT_KINDS, AdminApiServer, Faults
from click.testing import CliRunner
from psycopg.types.json import Jsonb
from supabase_auth.errors import AuthApiError, AuthError, AuthUnknownError
from test_auth_direct import (
    add_rejecting_trigger,
    assert_every_production_user_has_one_target_user,
    assert_identities_as_production_has_them,
    assert_nothing_the_auth_server_scans_is_null,
    assert_reregistered_users_keep_their_production_password,
    assert_sample_logs_in_with_production_password,
    created_by_a_first_run,
    resolve,
    sql,
    table_digest,
)

from devkit import scenario
from devkit.testbed import Database
from sync.auth import (
    AdminApi,
    AdminApiCreator,
    AuthOptions,
    MatchKind,
    UserMatch,
    create_attributes,
    is_transient_api_error,
    retry_after,
)
from sync.auth.admin_api import AuthServerError
from sync.auth.admin_api_errors import Exchange, failure_of
from sync.auth.admin_api_user import api_refusal
from sync.auth.report import hash_problem
from sync.cli import main
from sync.errors import UsageError


@pytest.fixture
async def api(seed_dbs: tuple[Database, Database]) -> AsyncIterator[AdminApiServer]:
    """The admin endpoints of the target (development) database, behaving."""
    async with AdminApiServer(seed_dbs[1].url) as server:
        yield server


def load_users(db: Database, users: list[dict[str, Any]], identities: list[dict[str, Any]]) -> None:
    """Insert these scenario users and identities into ``db`` as they are."""
    with psycopg.connect(db.admin_url) as conn, conn.cursor() as cur:
        for table, rows in (("users", users), ("identities", identities)):
            if not rows:
                continue
            query = psycopg.sql.SQL("INSERT INTO auth.{} ({}) VALUES ({})").format(
                psycopg.sql.Identifier(table),
                psycopg.sql.SQL(", ").join(map(psycopg.sql.Identifier, rows[0])),
                psycopg.sql.SQL(", ").join(psycopg.sql.Placeholder() * len(rows[0])),
            )
            cur.executemany(
                query, [[Jsonb(v) if isinstance(v, dict) else v for v in row.values()] for row in rows]
            )


def slice_of_production(seed: scenario.Scenario, every: int) -> scenario.Scenario:
    """The seed with every ``every``-th production user and all those of the kinds the checks name: the
    cost-10 hashes, the anonymous, soft-deleted and re-registered users (development as it is)."""
    reregistered, deleted = {e.lower() for e in seed.reregistered_emails}, set(seed.soft_deleted)
    kept = [
        u
        for n, u in enumerate(seed.production.users)
        if n % every == 0
        or n < scenario.COST10_USERS  # the first users drawn have the cost-10 hashes
        or u["is_anonymous"]
        or u["id"] in deleted
        or (u["email"] or "").lower() in reregistered
    ]
    ids = {u["id"] for u in kept}
    production = replace(
        seed.production, users=kept, identities=[i for i in seed.production.identities if i["user_id"] in ids]
    )
    pre_copy = replace(
        seed.pre_copy_production, users=[u for u in seed.pre_copy_production.users if u["id"] in ids]
    )
    return replace(seed, production=production, pre_copy_production=pre_copy)


@pytest.fixture
def quarter(
    make_db: Any, seed_templates: tuple[str, str], seed: scenario.Scenario
) -> tuple[scenario.Scenario, Database, Database]:
    """A quarter of production's users, every kind the checks name among them, in a source of their own;
    and a fresh copy of development."""
    part = slice_of_production(seed, every=4)
    source, target = make_db(), make_db(seed_templates[1])
    load_users(source, part.production.users, part.production.identities)
    return part, source, target


@pytest.fixture
def few(make_db: Any, seed: scenario.Scenario) -> tuple[Database, Database, list[dict[str, Any]]]:
    """A source holding the 40 newest production users with an e-mail, and an empty target."""
    source, target = make_db(), make_db()
    users = [u for u in seed.production.users if u["email"] and not u["deleted_at"]][-40:]
    ids = {u["id"] for u in users}
    load_users(source, users, [i for i in seed.production.identities if i["user_id"] in ids])
    return source, target, users


@pytest.mark.xdist_group("first-api-import")
def test_every_production_user_lands_through_the_api_and_signs_in_with_the_production_password(
    first_api_import: FirstApiImport,
    api_imported_dbs: tuple[Database, Database],
    seed: scenario.Scenario,
) -> None:
    _, target = api_imported_dbs
    report = first_api_import.report

    assert report.quarantined == 0 and report.exit_code == 0
    anonymous = [u for u in seed.production.users if u["is_anonymous"]]
    assert report.created == created_by_a_first_run(seed)
    direct = len(anonymous) + len(seed.soft_deleted)
    assert first_api_import.creates == report.created - direct, "anonymous and soft-deleted users go direct"
    assert not set(map(str, seed.soft_deleted)) & set(first_api_import.created_ids)
    assert report.matched_by_email == len(seed.reregistered_emails)
    assert_every_production_user_has_one_target_user(seed, target)
    assert_reregistered_users_keep_their_production_password(seed, target)
    assert_sample_logs_in_with_production_password(seed, target)
    assert_nothing_the_auth_server_scans_is_null(target)
    # The admin API gives every user it creates an e-mail identity; those production lacks are dropped.
    assert_identities_as_production_has_them(seed, target)

    # With the target DSN, what the API could not carry was written directly: times, OAuth identities.
    created = [u for u in seed.production.users if str(u["id"]) in set(first_api_import.created_ids)]
    columns = ("created_at", "email_confirmed_at", "last_sign_in_at", "raw_user_meta_data")
    landed = {
        row[0]: row[1:]
        for row in sql(
            target,
            f"SELECT id, {', '.join(columns)} FROM auth.users WHERE id = ANY(%s::uuid[])",
            [str(u["id"]) for u in created],
        )
    }
    assert landed == {u["id"]: tuple(u[c] for c in columns) for u in created}
    resolved = resolve(target)
    google = dict(sql(target, "SELECT provider_id, user_id FROM auth.identities WHERE provider = 'google'"))
    for identity in (i for i in seed.production.identities if i["provider"] == "google"):
        assert google[identity["provider_id"]] == resolved[identity["user_id"]]
    notes = [n.note for n in report.notes]
    assert sum("anonymous user" in n and "written directly" in n for n in notes) == len(anonymous)
    assert sum("soft-deleted by the Auth server" in n for n in notes) == len(seed.soft_deleted)
    # Soft-deleted users land as production has them: scrambled contacts, no password, deleted_at.
    deleted = [u for u in seed.production.users if u["id"] in set(seed.soft_deleted)]
    landed_deleted = sql(
        target,
        "SELECT id, email, phone, coalesce(encrypted_password, ''), deleted_at FROM auth.users "
        "WHERE id = ANY(%s) ORDER BY id",
        seed.soft_deleted,
    )
    assert landed_deleted == sorted(
        (u["id"], u["email"].lower(), u["phone"], "", u["deleted_at"]) for u in deleted
    )


async def test_with_30_percent_failures_every_user_lands_once(
    quarter: tuple[scenario.Scenario, Database, Database],
) -> None:
    part, source, target = quarter
    faults = Faults(
        seed=5,
        rate_limit_json=0.08,
        rate_limit_text=0.04,
        rate_limit_text_bare=0.03,
        server_error=0.08,
        bad_gateway=0.01,
        service_unavailable=0.01,
        gateway_timeout=0.01,
        commit_then_504=0.03,
        commit_then_drop=0.01,
    )
    async with AdminApiServer(target.url, faults=faults) as server:
        report = await run_api(source, target, server)

    assert set(faults.injected) == {kind for kind in FAULT_KINDS if getattr(faults, kind) > 0}, "every kind"
    assert faults.injected["commit_then_504"] > 0 and faults.injected["commit_then_drop"] > 0
    creates = [e for e in server.exchanges if e.route == "create"]
    assert sum(faults.injected.values()) > 0.25 * len(creates)
    assert report.quarantined == 0
    assert report.created == created_by_a_first_run(part)
    assert Counter(server.created_ids).most_common(1)[0][1] == 1, "no user was created twice"
    assert_every_production_user_has_one_target_user(part, target)
    assert_reregistered_users_keep_their_production_password(part, target)
    assert_sample_logs_in_with_production_password(part, target)


@pytest.mark.xdist_group("first-api-import")
async def test_a_second_run_through_the_api_creates_nothing_and_changes_nothing(
    api_imported_dbs: tuple[Database, Database], seed: scenario.Scenario
) -> None:
    source, target = api_imported_dbs  # as a first run through the API left them
    before = table_digest(target)

    async with AdminApiServer(target.url) as api:
        second = await run_api(source, target, api)

    assert (second.created, second.updated, second.identities_created, second.quarantined) == (0, 0, 0, 0)
    assert second.unchanged == len(seed.production.users)
    assert api.creates == 0
    assert table_digest(target) == before


async def test_a_user_the_target_trigger_rejects_is_quarantined_with_the_database_message(
    few: tuple[Database, Database, list[dict[str, Any]]],
) -> None:
    source, target, users = few
    refused = users[7]
    add_rejecting_trigger(target, refused["email"])

    async with AdminApiServer(target.url) as server:
        report = await run_api(source, target, server, retry_attempts=3)

    assert report.quarantined == 1 and report.exit_code == 3
    (entry,) = report.quarantine
    assert entry.source_id == refused["id"]
    # The API only says "Database error creating new user"; the direct write names the trigger's reason.
    assert entry.error == f"signups from {refused['email']} are closed"
    assert sql(target, "SELECT count(*) FROM _sync.quarantine WHERE resolved_at IS NULL") == [(1,)]
    assert report.created == len(users) - 1 == server.creates


async def test_without_the_target_dsn_the_report_says_what_the_api_could_not_carry(
    quarter: tuple[scenario.Scenario, Database, Database],
) -> None:
    part, source, target = quarter
    async with AdminApiServer(target.url) as api:
        report = await run_api(source, None, api)

    anonymous = {u["id"] for u in part.production.users if u["is_anonymous"]}
    # Soft-deleted users are refused up front: created through the API they would be live accounts.
    refused = anonymous | set(part.soft_deleted)
    assert {q.source_id for q in report.quarantine} == refused
    assert all("give the target DSN" in q.error for q in report.quarantine)
    assert all("soft-deleted" in q.error for q in report.quarantine if q.source_id not in anonymous)
    assert report.created == created_by_a_first_run(part) - len(refused) == api.creates
    notes = {n.source_id: n.note for n in report.notes}
    with_google = {i["user_id"] for i in part.production.identities if i["provider"] == "google"}
    created_google = [u for u in with_google if str(u) in set(api.created_ids)]
    assert created_google and all("google identity" in notes[u] for u in created_google)
    assert all("original creation and sign-in times" in notes[uuid.UUID(u)] for u in api.created_ids)
    # Re-registered people are still found (by e-mail through the API), but cannot take a new hash.
    assert report.matched_by_email == len(part.reregistered_emails)
    assert sql(target, "SELECT to_regnamespace('_sync')") == [(None,)], "nothing but the API was used"
    by_id = {str(u["id"]): u for u in part.production.users}
    for user_id in api.created_ids[:: len(api.created_ids) // 40]:
        ((hashed,),) = sql(target, "SELECT encrypted_password FROM auth.users WHERE id = %s", user_id)
        assert bcrypt.checkpw(scenario.password_for(by_id[user_id]["email"]).encode(), hashed.encode())


@pytest.mark.parametrize("with_dsn", [True, False], ids=["holder-from-database", "holder-from-api"])
async def test_an_address_held_by_another_users_identity_is_quarantined_with_the_reason(
    few: tuple[Database, Database, list[dict[str, Any]]], with_dsn: bool
) -> None:
    source, target, users = few
    person = users[5]
    # A development tester linked a Google account that carries this production user's address.
    sql(
        target,
        """
        WITH tester AS (
            INSERT INTO auth.users (instance_id, id, aud, role, email, encrypted_password, confirmation_token,
                recovery_token, email_change_token_new, email_change, created_at, updated_at)
            VALUES ('00000000-0000-0000-0000-000000000000', gen_random_uuid(), 'authenticated',
                'authenticated', 'qa@ultima.dev', '', '', '', '', '', now(), now())
            RETURNING id
        )
        INSERT INTO auth.identities (provider_id, user_id, identity_data, provider, created_at, updated_at)
        SELECT '9999', id, jsonb_build_object('sub', '9999', 'email', %s::text), 'google', now(), now()
        FROM tester
        """,
        person["email"],
    )

    async with AdminApiServer(target.url) as server:
        report = await run_api(source, target if with_dsn else None, server)

    (entry,) = report.quarantine
    assert entry.source_id == person["id"]
    assert "another user's identity" in entry.error and person["email"] in entry.error
    assert report.created == len(users) - 1


async def test_a_refused_service_role_key_is_one_clear_line(
    seed_dbs: tuple[Database, Database], api: AdminApiServer
) -> None:
    source, target = seed_dbs
    with pytest.raises(UsageError, match=r"refused the service-role key \(403 not_admin\)") as raised:
        await run_api(source, target, api, key="anon-key")
    assert "\n" not in str(raised.value) and "anon-key" not in str(raised.value)


def test_sync_run_in_admin_api_mode_never_prints_the_key(make_db: Any, seed: scenario.Scenario) -> None:
    source, target = make_db(), make_db()
    users = [u for u in seed.production.users[-60:] if not u["is_anonymous"]]
    ids = {u["id"] for u in users}
    load_users(source, users, [i for i in seed.production.identities if i["user_id"] in ids])

    async def serve_and_run() -> Any:
        async with AdminApiServer(target.url, service_key="very-secret-service-key") as server:
            runner = CliRunner(env={"SUPABASE_SERVICE_ROLE_KEY": "very-secret-service-key"})
            args = ["run", "--auth-only", "--auth-mode", "admin-api", "--supabase-url", server.url]
            args += ["--source", source.url, "--target", target.url, "--auth-concurrency", "4"]
            return await asyncio.to_thread(runner.invoke, main, args)

    result = asyncio.run(serve_and_run())

    assert result.exit_code == 0, result.output
    assert "very-secret-service-key" not in result.output
    assert f"created {len(users)}" in result.output
    assert sql(target, "SELECT count(*) FROM auth.users") == [(len(users),)]


# -------------------------------------------------------------------------------- the client's traps


def _client_error(status: int, headers: dict[str, str] | None = None) -> Exception:
    """What the supabase client raises for a non-JSON answer: the status lives on the httpx cause."""
    request = httpx.Request("POST", "http://auth/admin/users")
    cause = httpx.HTTPStatusError("busy", request=request, response=httpx.Response(status, headers=headers))
    error = AuthUnknownError("busy", cause)
    error.__cause__ = cause
    return error


def test_transient_answers_are_told_apart_from_refusals() -> None:
    assert is_transient_api_error(_client_error(429))
    assert is_transient_api_error(_client_error(502))
    assert not is_transient_api_error(_client_error(404))
    assert is_transient_api_error(AuthApiError("Database error creating new user", 500, "unexpected_failure"))
    assert not is_transient_api_error(AuthApiError("taken", 422, "email_exists"))


def test_retry_after_reads_seconds_and_dates() -> None:
    assert retry_after(_client_error(429, {"Retry-After": "7"})) == 7.0
    assert retry_after(_client_error(429, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})) == 0.0
    assert retry_after(_client_error(429)) is None


def source_row(**values: Any) -> dict[str, Any]:
    """A source auth.users row as the import reads it (jsonb as text)."""
    return {
        "id": uuid.uuid4(),
        "email": " Ana@Example.com ",
        "phone": "+52 155 0000 0001",
        "encrypted_password": bcrypt.hashpw(b"Ultima-001!", bcrypt.gensalt(4)).decode(),
        "email_confirmed_at": None,
        "phone_confirmed_at": None,
        "raw_user_meta_data": None,
        "raw_app_meta_data": '{"provider": "email", "providers": ["email"]}',
        "role": "authenticated",
        "aud": "authenticated",
        "banned_until": None,
        "deleted_at": None,
        **values,
    }


def test_the_create_body_always_carries_user_metadata_and_the_hash() -> None:
    row = source_row()
    user_id = row["id"]
    body = create_attributes(row, UserMatch(user_id, user_id, MatchKind.NEW))
    assert body == {
        "id": str(user_id),
        "user_metadata": {},
        "app_metadata": {"provider": "email", "providers": ["email"]},
        "email_confirm": False,
        "phone_confirm": False,
        "email": "ana@example.com",
        "phone": "5215500000001",
        "password_hash": row["encrypted_password"],
    }


# ------------------------------------------------------------------------ the real server's edges


def soft_delete_in(db: Database, user_id: uuid.UUID) -> None:
    """Soft-delete a user the way the Auth server does it (its admin DELETE with should_soft_delete)."""

    async def delete() -> None:
        async with AdminApiServer(db.url) as server, httpx.AsyncClient() as http:
            key = server.service_key
            answer = await http.request(
                "DELETE",
                f"{server.url}/auth/v1/admin/users/{user_id}",
                json={"should_soft_delete": True},
                headers={"apikey": key, "Authorization": f"Bearer {key}"},
            )
            answer.raise_for_status()

    asyncio.run(delete())


@pytest.fixture
def unusual(
    few: tuple[Database, Database, list[dict[str, Any]]],
) -> tuple[Database, Database, list[dict[str, Any]], list[uuid.UUID]]:
    """``few``, with two users soft-deleted by the Auth server and one whose address its check refuses."""
    source, target, users = few
    deleted = [users[3]["id"], users[11]["id"]]
    for user_id in deleted:
        soft_delete_in(source, user_id)
    refused = users[20]["id"]
    sql(source, "UPDATE auth.users SET email = 'josé@ejemplo.mx' WHERE id = %s", refused)
    return source, target, users, [*deleted, refused]


async def test_soft_deleted_and_refused_contact_users_land_through_the_direct_path(
    unusual: tuple[Database, Database, list[dict[str, Any]], list[uuid.UUID]],
) -> None:
    source, target, users, odd = unusual
    scrambled = dict(sql(source, "SELECT id, email FROM auth.users WHERE deleted_at IS NOT NULL"))
    assert len(scrambled) == 2 and all(len(e) == 43 and "@" not in e for e in scrambled.values())

    async with AdminApiServer(target.url) as server:
        report = await run_api(source, target, server)

    assert report.quarantined == 0 and report.exit_code == 0
    assert report.created == len(users)
    assert server.creates == len(users) - len(odd) and not set(map(str, odd)) & set(server.created_ids)
    notes = {n.source_id: n.note for n in report.notes if "written directly" in n.note}
    assert all("soft-deleted by the Auth server" in notes[u] for u in odd[:2])
    assert "format check" in notes[odd[2]]
    landed = dict(sql(target, "SELECT id, deleted_at IS NOT NULL FROM auth.users WHERE id = ANY(%s)", odd))
    assert landed == {odd[0]: True, odd[1]: True, odd[2]: False}


async def test_without_the_target_dsn_users_the_api_cannot_carry_are_refused_up_front(
    unusual: tuple[Database, Database, list[dict[str, Any]], list[uuid.UUID]],
) -> None:
    source, target, users, odd = unusual

    async with AdminApiServer(target.url) as server:
        report = await run_api(source, None, server)

    assert {q.source_id for q in report.quarantine} == set(odd)
    assert all("give the target DSN" in q.error for q in report.quarantine)
    assert server.creates == len(users) - len(odd), "none of them became a live account"
    assert sql(target, "SELECT count(*) FROM auth.users WHERE id = ANY(%s)", odd) == [(0,)]


async def test_a_server_that_ignores_the_id_stops_the_run_before_a_second_user_is_created(
    few: tuple[Database, Database, list[dict[str, Any]]],
) -> None:
    source, target, _ = few
    async with AdminApiServer(target.url, ignore_id_and_hash=True) as server:
        with pytest.raises(AuthServerError, match="ignored the id sent with admin create") as raised:
            await run_api(source, target, server)

    assert server.creates == 1
    assert "\n" not in str(raised.value)


async def test_a_server_that_drops_the_hash_stops_the_run_before_a_second_user_is_created(
    few: tuple[Database, Database, list[dict[str, Any]]],
) -> None:
    source, target, _ = few
    # As an Auth release before password_hash on admin create does: the user gets a password of its own.
    sql(
        target,
        """
        CREATE FUNCTION public.own_password() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            new.encrypted_password := '$2a$10$' || repeat('x', 53);
            RETURN new;
        END $$;
        CREATE TRIGGER own_password BEFORE INSERT ON auth.users
            FOR EACH ROW EXECUTE FUNCTION public.own_password();
        """,
    )
    async with AdminApiServer(target.url) as server:
        with pytest.raises(
            AuthServerError, match="ignored the password hash sent with admin create"
        ) as raised:
            await run_api(source, target, server)

    assert server.creates == 1
    assert "\n" not in str(raised.value)


async def test_an_intermittent_403_is_retried_and_the_run_completes(
    few: tuple[Database, Database, list[dict[str, Any]]],
) -> None:
    source, target, users = few
    # The key was accepted once (the check before any create); the creates then meet sporadic refusals.
    faults = Faults(script=["bad_jwt", "bad_jwt", None, None, "bad_jwt"])
    async with AdminApiServer(target.url, faults=faults) as server:
        report = await run_api(source, target, server)

    assert faults.injected["bad_jwt"] == 3
    assert report.quarantined == 0 and report.created == len(users) == server.creates
    assert Counter(server.created_ids).most_common(1)[0][1] == 1


def test_a_bad_key_is_one_line_exit_2_and_nothing_is_written(
    few: tuple[Database, Database, list[dict[str, Any]]],
) -> None:
    source, target, _ = few

    async def serve_and_run() -> Any:
        async with AdminApiServer(target.url) as server:
            runner = CliRunner(env={"SUPABASE_SERVICE_ROLE_KEY": "not-the-key"})
            args = ["run", "--auth-only", "--auth-mode", "admin-api", "--supabase-url", server.url]
            args += ["--source", source.url, "--target", target.url]
            return await asyncio.to_thread(runner.invoke, main, args), server.creates

    result, creates = asyncio.run(serve_and_run())

    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert "refused the service-role key (403 bad_jwt)" in result.output
    assert creates == 0
    assert sql(target, "SELECT count(*), to_regnamespace('_sync') FROM auth.users") == [(0, None)]


class ChainCutCreator(AdminApiCreator):
    """A client release that keeps nothing of the answer on its exceptions: no cause, no context."""

    @property
    def admin(self) -> Any:
        return _ChainCut(super().admin)


class _ChainCut:
    def __init__(self, admin: Any) -> None:
        self._admin = admin

    def __getattr__(self, name: str) -> Any:
        call = getattr(self._admin, name)

        async def cut(*args: Any, **kwargs: Any) -> Any:
            try:
                return await call(*args, **kwargs)
            except AuthError as exc:
                exc.__cause__ = exc.__context__ = None
                if hasattr(exc, "original_error"):
                    exc.original_error = None
                raise exc from None

        return cut


@pytest.mark.parametrize("creator", [AdminApiCreator, ChainCutCreator], ids=["chain_kept", "chain_cut"])
async def test_retry_after_is_honoured_whatever_the_exception_chain_keeps(
    supabase_db: Database, creator: type[AdminApiCreator]
) -> None:
    faults = Faults(script=["rate_limit_text"], retry_after="1")
    options = AuthOptions(mode="admin-api", retry_initial_wait=0.001, retry_max_wait=5)
    row = source_row()
    async with (
        AdminApiServer(supabase_db.url, faults=faults) as server,
        creator(AdminApi(url=server.url, service_role_key=server.service_key), options, {}) as client,
    ):
        started = time.monotonic()
        result = await client.create(row, UserMatch(row["id"], row["id"], MatchKind.NEW))
        waited = time.monotonic() - started

    assert result.outcome == "created" and server.creates == 1
    assert faults.injected["rate_limit_text"] == 1
    assert 1.0 <= waited < 4.0


async def test_a_cut_exception_chain_never_duplicates_a_user_under_30_percent_faults(
    supabase_db: Database, seed: scenario.Scenario
) -> None:
    users = [u for u in seed.production.users if u["email"] and not u["is_anonymous"]][-60:]
    faults = Faults(
        seed=11,
        rate_limit_json=0.06,
        rate_limit_text=0.06,
        server_error=0.06,
        bad_gateway=0.03,
        gateway_timeout=0.03,
        commit_then_504=0.04,
        commit_then_drop=0.02,
        retry_after="0",
    )
    options = AuthOptions(mode="admin-api", **FAST)
    async with (
        AdminApiServer(supabase_db.url, faults=faults, bcrypt_cost=4) as server,
        ChainCutCreator(
            AdminApi(url=server.url, service_role_key=server.service_key), options, {}
        ) as creator,
    ):
        results = await creator.create_all([(u, UserMatch(u["id"], u["id"], MatchKind.NEW)) for u in users])

    assert faults.injected["commit_then_504"] > 0 and faults.injected["commit_then_drop"] > 0
    assert faults.injected["rate_limit_text"] > 0
    assert [r.outcome for r in results] == ["created"] * len(users)
    assert sorted(server.created_ids) == sorted(str(u["id"]) for u in users), "each user created once"


def test_the_hash_check_follows_the_servers_limits() -> None:
    salt, digest = "c2FsdHNhbHQ", "aGFzaGhhc2hoYXNoaGFzaA"
    assert hash_problem(f"$argon2id$v=19$m=65536,t=3,p=4${salt}${digest}") is None
    assert "limits" in str(hash_problem(f"$argon2id$v=19$m=2097152,t=3,p=4${salt}${digest}"))
    assert "limits" in str(hash_problem(f"$argon2i$v=19$m=65536,t=21,p=4${salt}${digest}"))
    assert hash_problem("$fbscrypt$v=1,n=14,r=8,p=1,ss=Bw==,sk=ou9t$c2FsdA==$aGFzaA==") is None
    assert hash_problem("$fbscrypt$v=1,n=40,r=8,p=1,ss=Bw==,sk=ou9t$c2FsdA==$aGFzaA==") is not None


def test_a_ban_past_what_the_server_parses_is_capped() -> None:
    from datetime import UTC, datetime

    row = source_row(banned_until=datetime.max.replace(tzinfo=UTC))
    body = create_attributes(row, UserMatch(row["id"], row["id"], MatchKind.NEW))
    assert body["ban_duration"] == f"{(2**63 - 1) // 10**9}s"


def test_an_oversized_body_is_refused_before_it_is_sent() -> None:
    row = source_row(raw_user_meta_data={"bio": "x" * 1_100_000}, is_sso_user=False, is_anonymous=False)
    reason = api_refusal(row, UserMatch(row["id"], row["id"], MatchKind.NEW))
    assert reason is not None and "1,048,576-byte cap" in reason


def test_failures_are_classified_by_the_answer_the_wire_saw() -> None:
    request = httpx.Request("POST", "http://auth/admin/users")
    answer = httpx.Response(429, headers={"Retry-After": "3"}, text="busy", request=request)
    bare = AuthError("busy", None)  # nothing of the answer kept on the exception
    failure = failure_of(bare, Exchange(sent=True, response=answer))
    assert (failure.status, failure.transient, failure.retry_after) == (429, True, 3.0)
    timeout = failure_of(AuthError("timed out", None), Exchange(sent=True))
    assert timeout.transport and timeout.transient
    refused = httpx.Response(403, json={"code": "bad_jwt", "message": "invalid JWT"}, request=request)
    failure = failure_of(bare, Exchange(sent=True, response=refused))
    assert failure.refused_key and failure.code == "bad_jwt" and not failure.transient


# ----------------------------------------------------------------- look-ups without the target DSN


def api_creator(server: AdminApiServer) -> AdminApiCreator:
    """A creator talking to ``server`` with its service key, short waits."""
    api = AdminApi(url=server.url, service_role_key=server.service_key)
    return AdminApiCreator(api, AuthOptions(mode="admin-api", **FAST), {})


def insert_target_user(
    db: Database,
    *,
    email: str | None = None,
    phone: str | None = None,
    created_at: str = "2024-12-01 10:00:00+00",
    sso: bool = False,
) -> uuid.UUID:
    """A target user written by SQL, as an import script or an SSO sign-in left it; its id."""
    provider = f"sso:{uuid.UUID(int=7)}" if sso else "email"
    ((user_id,),) = sql(
        db,
        """
        INSERT INTO auth.users (instance_id, id, aud, role, email, phone, encrypted_password,
            confirmation_token, recovery_token, email_change_token_new, email_change, raw_app_meta_data,
            is_sso_user, created_at, updated_at)
        VALUES ('00000000-0000-0000-0000-000000000000', gen_random_uuid(), 'authenticated', 'authenticated',
            %s, %s, '', '', '', '', '', jsonb_build_object('provider', %s::text, 'providers',
            jsonb_build_array(%s::text)), %s, %s::timestamptz, %s::timestamptz)
        RETURNING id
        """,
        email,
        phone,
        provider,
        provider,
        sso,
        created_at,
        created_at,
    )
    return user_id


async def test_without_the_dsn_a_mixed_case_email_and_another_phone_format_are_matched(
    few: tuple[Database, Database, list[dict[str, Any]]],
) -> None:
    source, target, users = few
    by_email, by_phone = users[2], users[9]
    # The target holds the address as an admin script typed it, and the phone as the Auth server stores it;
    # production wrote its phone with a + and spaces.
    email_holder = insert_target_user(target, email=by_email["email"].upper())
    sql(source, "UPDATE auth.users SET phone = '+52 155 9876 5432' WHERE id = %s", by_phone["id"])
    phone_holder = insert_target_user(target, email="tester@ultima.dev", phone="5215598765432")

    async with AdminApiServer(target.url) as server:
        report = await run_api(source, None, server)

    assert (report.matched_by_email, report.matched_by_phone, report.quarantined) == (1, 1, 0)
    mapped = {m.source_id: (m.target_id, m.kind) for m in report.mapped}
    assert mapped[by_email["id"]] == (email_holder, MatchKind.EMAIL)
    assert mapped[by_phone["id"]] == (phone_holder, MatchKind.PHONE)
    assert report.created == len(users) - 2 == server.creates
    assert not {str(by_email["id"]), str(by_phone["id"])} & set(server.created_ids)


async def test_an_email_taken_answer_finds_its_holder_by_the_normalised_address(
    supabase_db: Database,
) -> None:
    # Another run (or a person) took the address and the phone after this run listed the target.
    email_holder = insert_target_user(supabase_db, email="Ana.Lopez@Example.com")
    phone_holder = insert_target_user(supabase_db, email="qa@ultima.dev", phone="5215500000001")
    by_email = source_row(email="ana.lopez@example.com", phone=None)
    by_phone = source_row(email=None, phone="+52 155 0000 0001")
    async with AdminApiServer(supabase_db.url) as server, api_creator(server) as creator:
        results = [
            await creator.create(row, UserMatch(row["id"], row["id"], MatchKind.NEW))
            for row in (by_email, by_phone)
        ]

    assert [(r.outcome, r.target_id, r.kind) for r in results] == [
        ("mapped", email_holder, MatchKind.EMAIL),
        ("mapped", phone_holder, MatchKind.PHONE),
    ]
    assert server.creates == 0


async def test_an_sso_user_with_the_same_email_is_never_matched(
    few: tuple[Database, Database, list[dict[str, Any]]],
) -> None:
    source, target, users = few
    person, held = users[4], users[6]
    # The target's SSO users: one with a production user's address, one whose address a tester's Google
    # identity also carries (the server then answers "email exists" for it).
    sso_user = insert_target_user(target, email=person["email"], sso=True)
    insert_target_user(target, email=held["email"], sso=True)
    tester = insert_target_user(target, email="qa@ultima.dev")
    sql(
        target,
        "INSERT INTO auth.identities (provider_id, user_id, identity_data, provider, created_at, updated_at) "
        "VALUES ('4242', %s, jsonb_build_object('sub', '4242', 'email', %s::text), 'google', now(), now())",
        tester,
        held["email"],
    )

    async with AdminApiServer(target.url) as server:
        report = await run_api(source, None, server)

    assert report.matched_by_email == 0
    assert str(person["id"]) in server.created_ids, "created as its own user, beside the SSO one"
    (entry,) = report.quarantine
    assert entry.source_id == held["id"] and "another user's identity" in entry.error
    same_address = "SELECT id FROM auth.users WHERE email = %s ORDER BY is_sso_user"
    assert sql(target, same_address, person["email"]) == [(person["id"],), (sso_user,)]


async def test_the_target_is_listed_page_by_page_each_user_once_even_when_created_at_ties(
    supabase_db: Database,
) -> None:
    # A bulk import gave 45 users one created_at: the server's pages (ORDER BY created_at, LIMIT/OFFSET)
    # do not order them the same way from one page to the next.
    tied = [insert_target_user(supabase_db, email=f"import{k}@ultima.dev") for k in range(45)]
    later = [
        insert_target_user(supabase_db, email=f"late{k}@ultima.dev", created_at=f"2024-12-02 10:00:{k}+00")
        for k in range(6)
    ]
    async with AdminApiServer(supabase_db.url) as server, api_creator(server) as creator:
        creator.page_size = 7
        keys = await creator.list_target()
        holder = await creator.find_holder("email", "late5@ultima.dev")
        pages = sum(1 for e in server.exchanges if e.route == "list")
        # The hazard is real: read page by page as the server answers, some tied users come twice.
        paged = [u["id"] for page in range(1, 9) for u in (await creator._list_page(page, 7))[0]]

    assert len(paged) == 51 and len(set(paged)) < 51
    assert sorted(k.id for k in keys) == sorted(tied + later), "every user once"
    assert holder == later[-1]
    assert pages >= 2 * 8, "the list went page by page, 7 users a page"


async def test_a_key_refused_on_every_look_up_after_the_check_is_one_line_not_a_traceback(
    few: tuple[Database, Database, list[dict[str, Any]]],
) -> None:
    source, target, _ = few
    # The key check passes; then the list the matching reads is refused, on every retry.
    faults = Faults(routes=frozenset({"list"}), script=[None], bad_jwt=1.0)
    async with AdminApiServer(target.url, faults=faults) as server:
        with pytest.raises(UsageError, match=r"refused the service-role key \(403 bad_jwt\)") as raised:
            await run_api(source, None, server)

    assert faults.injected["bad_jwt"] == 4, "three retries, then it stops"
    assert "\n" not in str(raised.value) and server.creates == 0
