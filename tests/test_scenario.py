"""The seed scenario, as built: the seed's counts, and the month's collisions, edits and re-registrations."""

from __future__ import annotations

import copy

import bcrypt
import psycopg
import pytest
from click.testing import CliRunner
from test_auth_admin_api import load_users, soft_delete_in

from devkit import scenario, testbed
from sync.cli import main


def rows(url: str, query: str, *params: object) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(query, params).fetchall()  # type: ignore[arg-type]


def checksum(url: str) -> dict[str, str]:
    tables = ["auth.users", "auth.identities", *(f"public.{t}" for t in scenario.APP_TABLES)]
    with psycopg.connect(url) as conn:
        return {
            t: conn.execute(
                f"SELECT md5(string_agg(x::text, '|' ORDER BY x::text)) FROM {t} AS x"
            ).fetchone()[0]
            for t in tables
        }


def test_both_databases_hold_the_seed_documents_exact_counts(seed_dbs):
    source, target = seed_dbs
    expected = scenario.expected_counts()
    for db, side in ((source, "production"), (target, "development")):
        counts = scenario.table_counts(db.url)
        assert {t: counts[t] for t in expected[side]} == expected[side]
    assert expected["production"]["auth.users"] == 4082
    assert expected["development"]["public.financing_requests"] == 883


def test_development_test_rows_collide_with_production_rows_on_integer_keys(seed_dbs):
    source, target = seed_dbs
    for table, collisions in scenario.DEV_TEST_ROWS.items():
        prod = {
            r[0]: r[1:] for r in rows(source.url, f"SELECT id, created_at, profile_id FROM public.{table}")
        }
        dev = {
            r[0]: r[1:] for r in rows(target.url, f"SELECT id, created_at, profile_id FROM public.{table}")
        }
        same_key_other_row = [k for k in dev if k in prod and dev[k] != prod[k]]
        assert len(same_key_other_row) == collisions, table


def test_production_edited_pre_copy_rows_after_the_copy(seed_dbs):
    source, target = seed_dbs
    edited = rows(
        source.url,
        "SELECT id, status::text FROM public.financing_requests WHERE created_at < %s AND updated_at >= %s",
        scenario.COPY_DATE,
        scenario.COPY_DATE,
    )
    assert len(edited) == 44
    dev = dict(rows(target.url, "SELECT id, status::text FROM public.financing_requests"))
    assert all(dev[rid] != status for rid, status in edited)
    profiles = rows(
        source.url,
        "SELECT count(*) FROM public.profiles WHERE created_at < %s AND updated_at >= %s",
        scenario.COPY_DATE,
        scenario.COPY_DATE,
    )
    assert profiles[0][0] == 34


def test_some_people_signed_up_again_in_development_with_their_production_email(seed_dbs):
    source, target = seed_dbs
    prod = dict(rows(source.url, "SELECT lower(trim(email)), id FROM auth.users WHERE email IS NOT NULL"))
    dev = rows(target.url, "SELECT email, id FROM auth.users WHERE email IS NOT NULL")
    same_person = [(email, uid) for email, uid in dev if email.strip().lower() in prod]
    reregistered = [(email, uid) for email, uid in same_person if prod[email.strip().lower()] != uid]
    assert len(reregistered) == scenario.DEV_REREGISTERED
    assert any(email != email.lower() for email, _ in reregistered), "some stored in another case"


def test_oauth_identities_and_phone_identities_exist_on_both_sides(seed_dbs):
    source, _ = seed_dbs
    for db in seed_dbs:
        providers = dict(rows(db.url, "SELECT provider, count(*) FROM auth.identities GROUP BY provider"))
        assert providers["google"] > 0 and providers["phone"] > 0 and providers["email"] > 0
    google = rows(
        source.url,
        "SELECT provider_id, identity_data->>'sub' FROM auth.identities WHERE provider = 'google' LIMIT 5",
    )
    assert all(pid == sub and pid.isdigit() for pid, sub in google)


def test_some_new_users_were_soft_deleted_as_the_auth_server_does_it_and_their_rows_stay(
    seed_dbs, make_db, seed: scenario.Scenario
):
    source, _ = seed_dbs
    assert len(seed.soft_deleted) == scenario.SOFT_DELETED_USERS
    assert rows(
        source.url,
        "SELECT count(DISTINCT profile_id) FROM public.financing_requests WHERE profile_id = ANY(%s)",
        seed.soft_deleted,
    ) == [(len(seed.soft_deleted),)], "their requests stay"
    deleted = rows(
        source.url,
        "SELECT length(email), position('@' in email), length(phone), encrypted_password, deleted_at "
        "FROM auth.users WHERE id = ANY(%s)",
        seed.soft_deleted,
    )
    assert all(row[:4] == (43, 0, 15, None) and row[4] is not None for row in deleted)

    # What the scenario writes is what the local Auth server's soft delete writes, for a live user with
    # an e-mail, a phone and a Google identity.
    person = copy.deepcopy(
        next(
            u
            for u in seed.production.users
            if u["phone"]
            and not u["deleted_at"]
            and any(i["user_id"] == u["id"] and i["provider"] == "google" for i in seed.production.identities)
        )
    )
    owned = [copy.deepcopy(i) for i in seed.production.identities if i["user_id"] == person["id"]]
    live = make_db()
    load_users(live, [person], owned)
    soft_delete_in(live, person["id"])
    scenario.soft_delete(person, owned, person["updated_at"])
    columns = [c for c in scenario.USER_COLUMNS if c not in ("deleted_at", "updated_at")]
    query = f"SELECT {', '.join(columns)}, deleted_at IS NOT NULL FROM auth.users WHERE id = %s"
    assert rows(live.url, query, person["id"]) == [(*(person[c] for c in columns), True)]
    assert sorted(
        rows(
            live.url,
            "SELECT provider, provider_id, identity_data FROM auth.identities WHERE user_id = %s",
            person["id"],
        )
    ) == sorted((i["provider"], i["provider_id"], i["identity_data"]) for i in owned)


def test_a_known_password_verifies_against_the_stored_hash_at_cost_4_and_10(seed_dbs):
    source, _ = seed_dbs
    users = rows(
        source.url,
        "SELECT email, encrypted_password FROM auth.users "
        "WHERE encrypted_password LIKE '$2%%' ORDER BY created_at LIMIT 40",
    )
    costs = {h.split("$")[2] for _, h in users}
    assert costs == {"04", "10"}
    for email, hashed in users:
        assert bcrypt.checkpw(scenario.password_for(email).encode(), hashed.encode()), email
        assert not bcrypt.checkpw(b"wrong password", hashed.encode())


def test_development_has_the_new_schema_and_the_signup_trigger(seed_dbs):
    _, target = seed_dbs
    columns = {
        c
        for (c,) in rows(
            target.url,
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = 'public' AND table_name = 'profiles'",
        )
    }
    assert {"display_name", "onboarding_step", "avatar_url"} <= columns and "full_name" not in columns
    assert rows(target.url, "SELECT count(*) FROM public.notifications")[0][0] == scenario.DEV_NOTIFICATIONS
    with psycopg.connect(target.url) as conn:
        conn.execute(
            "INSERT INTO auth.users (id, instance_id, aud, role, email, raw_user_meta_data, created_at,"
            " updated_at) VALUES (gen_random_uuid(), '00000000-0000-0000-0000-000000000000',"
            " 'authenticated', 'authenticated', 'new@x.mx', '{\"full_name\": \"Nueva\"}', now(), now())"
        )
        made = conn.execute("SELECT display_name FROM public.profiles WHERE email = 'new@x.mx'").fetchone()
        assert made == ("Nueva",)
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("UPDATE public.financing_requests SET term_months = 120 WHERE id = 1")


def test_the_builder_is_deterministic(seed_dbs, make_db):
    source, target = seed_dbs
    again_source, again_target = make_db(), make_db()
    data = scenario.generate()
    scenario.build_production(again_source.url, data)
    scenario.build_development(again_target.url, data)
    assert checksum(again_source.url) == checksum(source.url)
    assert checksum(again_target.url) == checksum(target.url)

    other = make_db()
    scenario.build_production(other.url, scenario.generate(seed=scenario.DEFAULT_SEED + 1))
    assert checksum(other.url)["auth.users"] != checksum(source.url)["auth.users"]


def test_scale_multiplies_every_count():
    data = scenario.generate(scale=2)
    assert len(data.production.users) == 2 * 4082
    assert len(data.development.rows["documents"]) == 2 * 548
    assert len(data.production.rows["financing_requests"]) == 2 * 2092


def test_sync_demo_builds_into_databases_the_user_names(make_db):
    source, target = make_db(), make_db()
    result = CliRunner().invoke(main, ["demo", "--source", source.url, "--target", target.url, "--no-sync"])
    assert result.exit_code == 0, result.output
    assert "4,082" in result.output and "1,133" in result.output
    assert f"{testbed.APP_ROLE}:{testbed.APP_PASSWORD}@" not in result.output
    assert f"{testbed.APP_ROLE}:***@" in result.output


def test_sync_demo_refuses_a_database_that_already_has_the_app(seed_dbs, make_db):
    source, _ = seed_dbs
    result = CliRunner().invoke(main, ["demo", "--source", source.url, "--target", make_db().url])
    assert result.exit_code == 1
    assert "already has public.profiles" in result.output


def test_sync_demo_syncs_the_scenario_and_verifies_it(make_db):
    source, target = make_db(), make_db()
    result = CliRunner().invoke(main, ["demo", "--source", source.url, "--target", target.url])
    assert result.exit_code == 0, result.output
    assert "Password check: 25 of 25 sampled production users" in result.output
    assert "verified: everything in scope is equal" in result.output
    assert scenario.table_counts(target.url)["public.documents"] == 1004 + 8
