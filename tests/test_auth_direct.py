"""Auth import, direct mode: every production user exists on the target and signs in with the same password.

The stories run on the seed scenario (production = source, development = target) as the non-superuser
``postgres`` role, like a hosted project; the checks at the top are shared with the admin-API tests.
"""

from __future__ import annotations

import random
import uuid
from typing import Any

import bcrypt
import psycopg
import pytest
from click.testing import CliRunner

from devkit import scenario
from devkit.testbed import Database
from sync.auth import (
    STRING_COLUMNS,
    AuthOptions,
    AuthReport,
    MatchKind,
    SourceKey,
    TargetKey,
    import_users,
    match_users,
)
from sync.auth.match import read_target_keys
from sync.cli import main
from sync.connect import Endpoint, Side, connect
from sync.errors import UsageError

# ------------------------------------------------------------------------------------- shared checks


def endpoints(source: Database, target: Database, *, admin: bool = False) -> tuple[Endpoint, Endpoint]:
    """Source and target endpoints as the ``postgres`` login (or the superuser with ``admin``)."""
    return (
        Endpoint.parse(Side.SOURCE, source.admin_url if admin else source.url),
        Endpoint.parse(Side.TARGET, target.admin_url if admin else target.url),
    )


async def run_direct(
    source: Database, target: Database, *, admin: bool = False, **options: Any
) -> AuthReport:
    """The direct import with ``options``."""
    return await import_users(*endpoints(source, target, admin=admin), AuthOptions(**options))


def sql(db: Database, query: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows of ``query`` on ``db`` (as the superuser, so nothing hides behind a privilege)."""
    with psycopg.connect(db.admin_url, autocommit=True) as conn:
        cur = conn.execute(query, args or None)
        return cur.fetchall() if cur.description else []


def resolve(target: Database) -> dict[uuid.UUID, uuid.UUID]:
    """Production user id → the target user that stands for it (same id, or through the id map)."""
    present = {row[0] for row in sql(target, "SELECT id FROM auth.users")}
    mapped = {
        uuid.UUID(source): uuid.UUID(dest)
        for source, dest in sql(
            target, "SELECT source_key, target_key FROM _sync.id_map WHERE table_name = 'auth.users'"
        )
    }
    return {user: user for user in present} | mapped


def assert_every_production_user_has_one_target_user(seed: scenario.Scenario, target: Database) -> None:
    resolved = resolve(target)
    present = {row[0] for row in sql(target, "SELECT id FROM auth.users")}
    production = [u["id"] for u in seed.production.users]
    missing = [u for u in production if resolved.get(u) not in present]
    assert missing == []
    # Exactly one: no two production users share a target user, and no address is held twice.
    assert len({resolved[u] for u in production}) == len(production)
    twice = sql(
        target,
        "SELECT lower(email), count(*) FROM auth.users WHERE email IS NOT NULL AND NOT is_sso_user "
        "GROUP BY 1 HAVING count(*) > 1",
    )
    assert twice == []


def assert_reregistered_users_keep_their_production_password(
    seed: scenario.Scenario, target: Database
) -> None:
    by_email = {u["email"]: u for u in seed.production.users if u["email"]}
    dev_ids = {str(u["email"]).lower(): u["id"] for u in seed.dev_only.users}
    resolved = resolve(target)
    for email in seed.reregistered_emails:
        production_id = by_email[email]["id"]
        assert resolved[production_id] == dev_ids[email.lower()], (
            "mapped onto the account made in development"
        )
        assert sql(target, "SELECT 1 FROM auth.users WHERE id = %s", production_id) == []
        ((hashed, stored_email, confirmed),) = sql(
            target,
            "SELECT encrypted_password, email, email_confirmed_at FROM auth.users WHERE id = %s",
            resolved[production_id],
        )
        assert bcrypt.checkpw(scenario.password_for(email).encode(), hashed.encode())
        assert not bcrypt.checkpw(scenario.dev_password_for(email).encode(), hashed.encode())
        assert stored_email == email.lower()
        assert confirmed == by_email[email]["email_confirmed_at"]


def assert_sample_logs_in_with_production_password(seed: scenario.Scenario, target: Database) -> None:
    users = [u for u in seed.production.users if u["email"] and u["encrypted_password"]]
    cost10 = [u for u in users if u["encrypted_password"].startswith("$2b$10$")]
    assert len(cost10) == scenario.COST10_USERS
    sample = cost10 + random.Random(7).sample(users, 40)
    resolved = resolve(target)
    for user in sample:
        ((hashed,),) = sql(
            target, "SELECT encrypted_password FROM auth.users WHERE id = %s", resolved[user["id"]]
        )
        assert bcrypt.checkpw(scenario.password_for(user["email"]).encode(), hashed.encode()), user["email"]


def assert_nothing_the_auth_server_scans_is_null(target: Database) -> None:
    columns = [*STRING_COLUMNS, "email_change_confirm_status", "created_at", "updated_at", "instance_id"]
    nulls = sql(
        target,
        "SELECT " + ", ".join(f"count(*) FILTER (WHERE {c} IS NULL)" for c in columns) + " FROM auth.users",
    )
    assert dict(zip(columns, nulls[0], strict=True)) == dict.fromkeys(columns, 0)
    assert sql(
        target, "SELECT count(*) FROM auth.identities WHERE created_at IS NULL OR updated_at IS NULL"
    ) == [(0,)]
    assert sql(target, "SELECT count(*) FROM auth.users WHERE phone = '' OR email = ''") == [(0,)]


def assert_identities_as_production_has_them(seed: scenario.Scenario, target: Database) -> None:
    """Each production user's target user has production's identities: no more, no fewer.

    E-mail and phone identities are named by provider alone (their provider_id is the user's own id).
    """

    def name(provider: str, provider_id: str) -> str:
        return provider if provider in ("email", "phone") else f"{provider}:{provider_id}"

    wanted: dict[uuid.UUID, set[str]] = {u["id"]: set() for u in seed.production.users}
    for i in seed.production.identities:
        wanted[i["user_id"]].add(name(i["provider"], i["provider_id"]))
    held: dict[uuid.UUID, set[str]] = {}
    for user_id, provider, provider_id in sql(
        target, "SELECT user_id, provider, provider_id FROM auth.identities"
    ):
        held.setdefault(user_id, set()).add(name(provider, provider_id))
    resolved = resolve(target)
    # A person who signed up again on the target keeps the identities of that sign-up too.
    assert {u: held.get(resolved[u], set()) for u in wanted if resolved[u] == u} == {
        u: ids for u, ids in wanted.items() if resolved[u] == u
    }
    assert all(wanted[u] <= held.get(resolved[u], set()) for u in wanted)
    # The e-mail identities point at their user the way the Auth server writes them (its soft delete
    # scrambles them: provider id and data).
    wrong = sql(
        target,
        "SELECT i.id FROM auth.identities AS i JOIN auth.users AS u ON u.id = i.user_id "
        "WHERE i.provider = 'email' AND u.deleted_at IS NULL AND "
        "(i.provider_id <> i.user_id::text OR i.identity_data ->> 'sub' <> i.user_id::text)",
    )
    assert wrong == []


def table_digest(db: Database) -> list[tuple[Any, ...]]:
    """A fingerprint of everything the auth import may write."""
    return sql(
        db,
        "SELECT (SELECT md5(string_agg(u::text, '|' ORDER BY u.id)) FROM auth.users AS u), "
        "(SELECT md5(string_agg(i::text, '|' ORDER BY i.id)) FROM auth.identities AS i), "
        "(SELECT md5(string_agg(m.source_key || m.target_key, '|' ORDER BY m.source_key)) "
        "FROM _sync.id_map AS m), "
        "(SELECT count(*) FROM public.profiles)",
    )


def add_rejecting_trigger(target: Database, email: str) -> None:
    """A project trigger on auth.users that refuses one address, as a misbehaving signup hook would."""
    sql(
        target,
        f"""
        CREATE FUNCTION public.refuse_one() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF new.email = '{email}' THEN
                RAISE EXCEPTION 'signups from % are closed', new.email;
            END IF;
            RETURN new;
        END $$;
        CREATE TRIGGER refuse_one AFTER INSERT ON auth.users
            FOR EACH ROW EXECUTE FUNCTION public.refuse_one();
        """,
    )


def created_by_a_first_run(seed: scenario.Scenario) -> int:
    """Production users the target lacks: created after the copy, and not re-registered there."""
    return len(seed.production.users) - len(seed.pre_copy_production.users) - len(seed.reregistered_emails)


def new_production_users(seed: scenario.Scenario) -> list[dict[str, Any]]:
    """Production users created after the copy, with an e-mail, live (not soft-deleted) and not
    re-registered in development."""
    old = {u["id"] for u in seed.pre_copy_production.users}
    taken = {e.lower() for e in seed.reregistered_emails}
    return [
        u
        for u in seed.production.users
        if u["id"] not in old and u["email"] and not u["deleted_at"] and u["email"] not in taken
    ]


# ---------------------------------------------------------------------------------------- the stories


async def test_every_production_user_lands_once_and_signs_in_with_the_production_password(
    seed_dbs: tuple[Database, Database], seed: scenario.Scenario
) -> None:
    source, target = seed_dbs
    report = await run_direct(source, target)

    assert report.quarantined == 0 and report.exit_code == 0
    assert report.source_users == len(seed.production.users)
    assert report.created == created_by_a_first_run(seed)
    assert report.matched_by_id == len(seed.pre_copy_production.users)
    assert report.matched_by_email == len(seed.reregistered_emails)
    assert_every_production_user_has_one_target_user(seed, target)
    assert_reregistered_users_keep_their_production_password(seed, target)
    assert_sample_logs_in_with_production_password(seed, target)
    assert_nothing_the_auth_server_scans_is_null(target)
    assert sql(target, "SELECT count(*) FROM auth.users WHERE email <> lower(email)") == [(0,)]
    assert_identities_as_production_has_them(seed, target)
    assert any("MFA" in line or "sessions" in line for line in report.not_copied)


async def test_oauth_and_phone_identities_arrive_with_their_subjects(
    seed_dbs: tuple[Database, Database], seed: scenario.Scenario
) -> None:
    source, target = seed_dbs
    await run_direct(source, target)

    resolved = resolve(target)
    landed = {
        (provider_id, provider): (user_id, data)
        for provider_id, provider, user_id, data in sql(
            target, "SELECT provider_id, provider, user_id, identity_data FROM auth.identities"
        )
    }
    deleted = set(seed.soft_deleted)
    live = [i for i in seed.production.identities if i["user_id"] not in deleted]
    google = [i for i in live if i["provider"] == "google"]
    assert google
    for identity in google:
        user_id, data = landed[(identity["provider_id"], "google")]
        assert user_id == resolved[identity["user_id"]]
        assert data["sub"] == identity["provider_id"] and data["email"] == data["email"].lower()
    # The Auth server's soft delete scrambled these subjects and emptied their data: they come as they are.
    scrambled = [i for i in seed.production.identities if i["user_id"] in deleted]
    assert {i["provider"] for i in scrambled} >= {"email", "google"}
    for identity in scrambled:
        assert landed[(identity["provider_id"], identity["provider"])] == (identity["user_id"], {})
    for identity in (i for i in live if i["provider"] == "phone"):
        target_id = resolved[identity["user_id"]]
        user_id, data = landed[(str(target_id), "phone")]
        assert user_id == target_id and data["sub"] == str(target_id)


async def test_a_google_only_user_gets_no_email_identity_and_a_reregistered_user_keeps_its_subject(
    seed_dbs: tuple[Database, Database], seed: scenario.Scenario
) -> None:
    source, target = seed_dbs
    google = next(
        u["id"]
        for u in new_production_users(seed)
        if any(i["user_id"] == u["id"] and i["provider"] == "google" for i in seed.production.identities)
    )
    # Signed up with Google only: no password, no e-mail identity, as the Auth server leaves such a user.
    sql(source, "UPDATE auth.users SET encrypted_password = '' WHERE id = %s", google)
    sql(source, "DELETE FROM auth.identities WHERE user_id = %s AND provider <> 'google'", google)
    email = seed.reregistered_emails[0]
    sql(
        source,
        "UPDATE auth.users SET raw_user_meta_data = raw_user_meta_data "
        "|| jsonb_build_object('sub', id::text) "
        "WHERE lower(email) = lower(%s)",
        email,
    )
    await run_direct(source, target)

    assert sql(target, "SELECT provider FROM auth.identities WHERE user_id = %s", google) == [("google",)]
    [(production_id,)] = sql(source, "SELECT id::text FROM auth.users WHERE lower(email) = lower(%s)", email)
    [(target_id, subject)] = sql(
        target,
        "SELECT id::text, raw_user_meta_data ->> 'sub' FROM auth.users WHERE lower(email) = lower(%s)",
        email,
    )
    assert target_id != production_id and subject == target_id


async def test_a_second_run_creates_nothing_and_changes_nothing(
    seed_dbs: tuple[Database, Database], seed: scenario.Scenario
) -> None:
    source, target = seed_dbs
    first = await run_direct(source, target)
    before = table_digest(target)

    second = await run_direct(source, target)

    assert first.created > 0 and first.updated > 0
    assert (second.created, second.updated, second.identities_created, second.quarantined) == (0, 0, 0, 0)
    assert second.unchanged == len(seed.production.users)
    assert second.matched_by_email == len(seed.reregistered_emails)
    assert table_digest(target) == before


async def test_a_user_the_target_trigger_rejects_is_quarantined_and_the_rest_land(
    seed_dbs: tuple[Database, Database], seed: scenario.Scenario
) -> None:
    source, target = seed_dbs
    refused = new_production_users(seed)[100]
    add_rejecting_trigger(target, refused["email"])

    report = await run_direct(source, target, batch_size=400)

    assert report.quarantined == 1 and report.exit_code == 3
    assert report.quarantine[0].source_id == refused["id"]
    ((error, sqlstate, row),) = sql(
        target,
        "SELECT error, sqlstate, row_data FROM _sync.quarantine WHERE table_name = 'auth.users' "
        "AND source_key = %s AND resolved_at IS NULL",
        str(refused["id"]),
    )
    assert error == f"signups from {refused['email']} are closed" and sqlstate == "P0001"
    assert row["email"] == refused["email"] and "encrypted_password" not in row
    assert sql(target, "SELECT count(*) FROM auth.users WHERE id = %s", refused["id"]) == [(0,)]
    assert report.created == created_by_a_first_run(seed) - 1
    # The signup trigger still made the other new users' profiles, as it does for any insert.
    assert sql(target, "SELECT count(*) FROM public.profiles") == sql(
        target, "SELECT count(*) FROM auth.users"
    )

    # Once the trigger is fixed, the next run lands the user and closes its quarantine entry.
    sql(target, "DROP TRIGGER refuse_one ON auth.users")
    again = await run_direct(source, target)
    assert again.created == 1 and again.quarantined == 0
    assert sql(target, "SELECT count(*) FROM _sync.quarantine WHERE resolved_at IS NULL") == [(0,)]


async def test_skipping_triggers_needs_a_role_allowed_to_and_then_no_trigger_fires(
    seed_dbs: tuple[Database, Database], seed: scenario.Scenario
) -> None:
    source, target = seed_dbs
    refused = new_production_users(seed)[0]
    add_rejecting_trigger(target, refused["email"])

    with pytest.raises(UsageError, match="refuses SET session_replication_role for role 'postgres'"):
        await run_direct(source, target, triggers="skip")
    assert sql(target, "SELECT to_regnamespace('_sync')") == [(None,)], "nothing was written"

    profiles = sql(target, "SELECT count(*) FROM public.profiles")
    report = await run_direct(source, target, admin=True, triggers="skip")

    assert report.quarantined == 0
    assert sql(target, "SELECT count(*) FROM auth.users WHERE id = %s", refused["id"]) == [(1,)]
    assert sql(target, "SELECT count(*) FROM public.profiles") == profiles, "the signup trigger did not fire"
    assert_every_production_user_has_one_target_user(seed, target)
    assert_identities_as_production_has_them(seed, target)


async def test_a_role_without_insert_on_auth_users_gets_one_clear_line_and_nothing_is_written(
    seed_dbs: tuple[Database, Database],
) -> None:
    source, target = seed_dbs
    sql(
        target,
        """
        DO $$ BEGIN
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'sync_test_no_insert') THEN
                CREATE ROLE sync_test_no_insert LOGIN PASSWORD 'no-insert' BYPASSRLS;
            END IF;
        END $$;
        GRANT USAGE ON SCHEMA auth TO sync_test_no_insert;
        GRANT SELECT, UPDATE ON auth.users, auth.identities TO sync_test_no_insert;
        GRANT INSERT ON auth.identities TO sync_test_no_insert;
        """,
    )
    limited = Endpoint.parse(
        Side.TARGET, target.url.replace("postgres:postgres@", "sync_test_no_insert:no-insert@")
    )

    with pytest.raises(UsageError) as raised:
        await import_users(Endpoint.parse(Side.SOURCE, source.url), limited, AuthOptions())

    message = str(raised.value)
    assert "\n" not in message
    assert "target role 'sync_test_no_insert' lacks INSERT on auth.users" in message
    assert sql(target, "SELECT to_regnamespace('_sync')") == [(None,)]


async def test_deleted_banned_anonymous_and_sso_users_follow_the_documented_rules(
    seed_dbs: tuple[Database, Database], seed: scenario.Scenario
) -> None:
    source, target = seed_dbs
    fresh = new_production_users(seed)
    deleted, sso = fresh[10], fresh[11]
    tester = "qa1@ultima.dev"  # a development-only account
    sql(source, "UPDATE auth.users SET deleted_at = now(), email = %s WHERE id = %s", tester, deleted["id"])
    sql(source, "UPDATE auth.users SET is_sso_user = true, email = 'QA2@ultima.dev' WHERE id = %s", sso["id"])

    report = await run_direct(source, target)

    assert report.quarantined == 0
    # Deleted: never takes over a live account by its address; created without the address instead.
    assert sql(
        target, "SELECT email, deleted_at IS NOT NULL FROM auth.users WHERE id = %s", deleted["id"]
    ) == [(None, True)]
    assert sql(target, "SELECT count(*) FROM auth.users WHERE email = %s", tester) == [(1,)]
    # SSO: matched by id only, created beside the password account with the same address.
    assert sql(target, "SELECT email, is_sso_user FROM auth.users WHERE id = %s", sso["id"]) == [
        ("qa2@ultima.dev", True)
    ]
    notes = {n.source_id: n.note for n in report.notes}
    assert "deleted in production" in notes[deleted["id"]]
    assert "SSO user" in notes[sso["id"]]
    # Banned and anonymous users keep what makes them so.
    for user in seed.production.users:
        if user["banned_until"] or user["is_anonymous"]:
            assert sql(
                target, "SELECT banned_until, is_anonymous FROM auth.users WHERE id = %s", user["id"]
            ) == [(user["banned_until"], user["is_anonymous"])]


async def test_two_production_users_on_one_address_the_second_is_quarantined_with_the_reason(
    seed_dbs: tuple[Database, Database], seed: scenario.Scenario
) -> None:
    source, target = seed_dbs
    first, second = new_production_users(seed)[20:22]
    sql(source, "UPDATE auth.users SET email = upper(%s) WHERE id = %s", first["email"], second["id"])

    report = await run_direct(source, target)

    assert report.quarantined == 1
    (entry,) = report.quarantine
    assert entry.source_id == second["id"]
    assert f"e-mail {first['email']}" in entry.error and str(first["id"]) in entry.error
    assert sql(target, "SELECT id FROM auth.users WHERE lower(email) = %s", first["email"]) == [
        (first["id"],)
    ]


async def test_target_wins_maps_reregistered_users_but_keeps_their_development_password(
    seed_dbs: tuple[Database, Database], seed: scenario.Scenario
) -> None:
    source, target = seed_dbs
    report = await run_direct(source, target, policy="target-wins")

    assert report.matched_by_email == len(seed.reregistered_emails)
    resolved = resolve(target)
    by_email = {u["email"]: u["id"] for u in seed.production.users if u["email"]}
    for email in seed.reregistered_emails:
        ((hashed,),) = sql(
            target, "SELECT encrypted_password FROM auth.users WHERE id = %s", resolved[by_email[email]]
        )
        assert bcrypt.checkpw(scenario.dev_password_for(email).encode(), hashed.encode())
    # Even so, a NULL the Auth server cannot read is repaired on every matched user.
    assert_nothing_the_auth_server_scans_is_null(target)


def test_sync_run_auth_only_prints_the_report_and_exits_by_outcome(
    seed_dbs: tuple[Database, Database], seed: scenario.Scenario
) -> None:
    source, target = seed_dbs
    refused = new_production_users(seed)[3]
    add_rejecting_trigger(target, refused["email"])
    runner = CliRunner()
    args = ["run", "--auth-only", "--source", source.url, "--target", target.url]

    first = runner.invoke(main, [*args, "--json"])

    assert first.exit_code == 3, first.output
    report = AuthReport.model_validate_json(first.stdout)
    assert report.created == created_by_a_first_run(seed) - 1 and report.quarantined == 1
    assert "postgres:postgres" not in first.output

    sql(target, "DROP TRIGGER refuse_one ON auth.users")
    second = runner.invoke(main, args)
    assert second.exit_code == 0, second.output
    assert "created 1 ·" in second.output and "quarantined 0" in second.output


def test_sync_run_admin_api_mode_needs_the_project_url_and_key(seed_dbs: tuple[Database, Database]) -> None:
    source, target = seed_dbs
    result = CliRunner(env={"SUPABASE_URL": None, "SUPABASE_SERVICE_ROLE_KEY": None}).invoke(
        main,
        ["run", "--auth-only", "--auth-mode", "admin-api", "--source", source.url, "--target", target.url],
    )
    assert result.exit_code == 2 and "SUPABASE_SERVICE_ROLE_KEY" in result.output


# ------------------------------------------------------------------------------------ matching rules


def _ids(n: int) -> list[uuid.UUID]:
    return [uuid.UUID(int=i + 1) for i in range(n)]


def test_matching_prefers_id_then_id_map_then_email_then_phone() -> None:
    a, b, c, d, t1, t2, t3 = _ids(7)
    target = [
        TargetKey(a, "a@x.com", None),
        TargetKey(t1, "b@x.com", None),
        TargetKey(t2, None, "5215500000001"),
        TargetKey(t3, "old@x.com", None),
    ]
    source = [
        SourceKey(a, "a@x.com", None),
        SourceKey(b, "b@x.com", None),
        SourceKey(c, "c@x.com", "5215500000001"),
        SourceKey(d, "new@x.com", None),
    ]
    matches = match_users(source, target, {d: (t3, "email")})
    assert [(m.target_id, m.kind) for m in matches] == [
        (a, MatchKind.ID),
        (t1, MatchKind.EMAIL),
        (t2, MatchKind.PHONE),
        (t3, MatchKind.EMAIL),
    ]


def test_matching_never_takes_over_an_account_for_a_deleted_or_sso_user() -> None:
    deleted, sso, holder = _ids(3)
    target = [TargetKey(holder, "a@x.com", "5215500000001")]
    matches = match_users(
        [
            SourceKey(deleted, "a@x.com", "5215500000001", deleted=True),
            SourceKey(sso, "a@x.com", None, is_sso_user=True),
        ],
        target,
    )
    assert [(m.kind, m.target_id, m.keep_email, m.keep_phone) for m in matches] == [
        (MatchKind.NEW, deleted, False, False),
        (MatchKind.NEW, sso, True, True),
    ]


def test_a_same_id_match_wins_the_target_user_over_an_older_email_match() -> None:
    older, owner = _ids(2)
    target = [TargetKey(owner, "a@x.com", None)]
    matches = match_users(
        [SourceKey(older, "A@x.com".lower(), None), SourceKey(owner, "a@x.com", None)], target
    )
    assert matches[0].kind is MatchKind.QUARANTINED and str(owner) in (matches[0].reason or "")
    assert matches[1].kind is MatchKind.ID


def test_among_case_variants_on_the_target_the_lower_case_row_is_matched() -> None:
    upper, lower, person = _ids(3)
    target = [TargetKey(upper, "a@x.com", None, exact_email=False), TargetKey(lower, "a@x.com", None)]
    (match,) = match_users([SourceKey(person, "a@x.com", None)], target)
    assert match.target_id == lower


async def test_the_source_is_only_ever_read(seed_dbs: tuple[Database, Database]) -> None:
    source, target = seed_dbs
    sql(
        source,
        """
        CREATE FUNCTION public.no_writes() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'the source was written'; END $$;
        CREATE TRIGGER no_writes BEFORE INSERT OR UPDATE OR DELETE ON auth.users
            FOR EACH STATEMENT EXECUTE FUNCTION public.no_writes();
        CREATE TRIGGER no_writes BEFORE INSERT OR UPDATE OR DELETE ON auth.identities
            FOR EACH STATEMENT EXECUTE FUNCTION public.no_writes();
        """,
    )
    report = await run_direct(source, target)
    assert report.created > 0 and report.quarantined == 0


def test_a_moved_address_follows_the_user_unless_another_user_holds_it() -> None:
    moved, blocked, other = _ids(3)
    target = [
        TargetKey(moved, "old@x.com", None),
        TargetKey(blocked, "mine@x.com", "5215500000009"),
        TargetKey(other, "taken@x.com", None),
    ]
    source = [SourceKey(moved, "new@x.com", None), SourceKey(blocked, "taken@x.com", "5215500000009")]
    first, second = match_users(source, target)
    assert (first.kind, first.keep_email, first.reason) == (MatchKind.ID, True, None)
    assert (second.kind, second.keep_email, second.keep_phone) == (MatchKind.ID, False, True)
    assert f"e-mail taken@x.com (held by target user {other})" in (second.reason or "")


async def test_the_matcher_reads_only_the_target_users_it_can_meet_and_matches_as_over_all(
    seed_dbs: tuple[Database, Database],
) -> None:
    _, target = seed_dbs
    ids = [uuid.uuid4() for _ in range(6)]
    # Stored as an old import or another tool may have left them: another case, spaces, a "+".
    sql(
        target,
        """
        INSERT INTO auth.users (id, email, phone, is_sso_user, created_at)
        VALUES (%s, ' Mixed@Case.com', NULL, false, '2020-01-01'), (%s, 'mixed@case.com', NULL, false, now()),
               (%s, NULL, '+52 1 55 9999 0099', false, now()), (%s, 'sso@corp.com', NULL, true, now()),
               (%s, 'plain@x.com', '5215599990098', false, now()), (%s, 'far@away.com', NULL, false, now())
        """,
        *ids,
    )
    mixed, lower, spaced_phone, sso, plain, _ = ids
    mapped = uuid.uuid4()
    source = [
        SourceKey(uuid.uuid4(), "mixed@case.com", "5215599990099"),
        SourceKey(uuid.uuid4(), "plain@x.com", None),
        SourceKey(uuid.uuid4(), "sso@corp.com", "5215599990098", is_sso_user=True),
        SourceKey(mapped, "someone@else.com", None),
    ]
    id_map = {mapped: (ids[5], "email")}
    conn = await connect(endpoints(target, target, admin=True)[1])
    try:
        every = await read_target_keys(conn)
        met = await read_target_keys(conn, source, id_map)
    finally:
        await conn.close()
    assert {lower, spaced_phone, plain, ids[5]} <= {t.id for t in met}
    assert mixed in {t.id for t in met}  # a case variant is read too: the oldest may not be the match
    assert sso not in {t.id for t in met}  # an SSO user is never found by its e-mail
    assert len(met) < len(every) // 10
    assert match_users(source, met, id_map) == match_users(source, every, id_map)
    assert [m.target_id for m in match_users(source, met, id_map)][:2] == [lower, plain]
