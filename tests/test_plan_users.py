"""`sync plan` counts users as `sync run` then matches them: one matcher, the same readers."""

from __future__ import annotations

from pathlib import Path

import psycopg
from click.testing import CliRunner
from test_auth_direct import new_production_users, sql

from devkit import scenario
from devkit.testbed import Database
from sync.auth import AuthReport
from sync.cli import main
from sync.plan import PlanReport
from sync.resources import sql_dir

SHIPPED = str(Path(__file__).resolve().parent.parent / "mappings" / "sync.toml")


def dev_account(seed: scenario.Scenario, email: str) -> dict:
    """A development-only account (``qa1@ultima.dev`` …)."""
    return next(u for u in seed.dev_only.users if u["email"] == email)


def test_plan_promises_the_user_counts_the_run_then_reports(
    seed_dbs: tuple[Database, Database], seed: scenario.Scenario
) -> None:
    source, target = seed_dbs
    fresh = new_production_users(seed)
    old = [u for u in seed.pre_copy_production.users if u["email"]]
    # One phone in two formats: production kept the typed "+52 155 …", the target stores digits.
    spaced = fresh[0]
    sql(source, "UPDATE auth.users SET phone = '+52 155 9000 0001' WHERE id = %s", spaced["id"])
    sql(
        target,
        "UPDATE auth.users SET phone = '5215590000001' WHERE id = %s",
        dev_account(seed, "qa1@ultima.dev")["id"],
    )
    # Dashes are not whitespace: the run does not take "+52-155-…" for the target's digits.
    dashed = fresh[1]
    sql(source, "UPDATE auth.users SET phone = '+52-155-9000-0002' WHERE id = %s", dashed["id"])
    sql(target, "UPDATE auth.users SET phone = '5215590000002' WHERE id = %s", old[0]["id"])
    # A user deleted in production whose address a development account holds: created, never matched.
    deleted = fresh[2]
    sql(
        source,
        "UPDATE auth.users SET deleted_at = now(), email = 'qa3@ultima.dev' WHERE id = %s",
        deleted["id"],
    )
    # An SSO user on a password account's address: matched by id only.
    ((taken,),) = sql(target, "SELECT email FROM auth.users WHERE id = %s", old[1]["id"])
    sso = fresh[3]
    sql(source, "UPDATE auth.users SET is_sso_user = true, email = %s WHERE id = %s", taken, sso["id"])
    # An earlier run mapped this production user onto a development account.
    mapped = fresh[4]
    with psycopg.connect(target.url, autocommit=True) as conn:  # as the login the run uses
        conn.execute((sql_dir() / "state.sql").read_text())
    sql(
        target,
        "INSERT INTO _sync.id_map (table_name, source_key, target_key, reason) "
        "VALUES ('auth.users', %s, %s, 'email')",
        str(mapped["id"]),
        str(dev_account(seed, "qa2@ultima.dev")["id"]),
    )

    planned = CliRunner().invoke(
        main, ["plan", "--source", source.url, "--target", target.url, "--mapping", SHIPPED, "--json"]
    )
    assert planned.exit_code == 0, planned.output
    promised = PlanReport.model_validate_json(planned.stdout).users
    ran = CliRunner().invoke(
        main, ["run", "--auth-only", "--source", source.url, "--target", target.url, "--json"]
    )
    assert ran.exit_code == 0, ran.output
    done = AuthReport.model_validate_json(ran.stdout)

    assert promised is not None
    assert (
        promised.source,
        promised.matched_by_id,
        promised.matched_by_email,
        promised.matched_by_phone,
    ) == (
        done.source_users,
        done.matched_by_id,
        done.matched_by_email,
        done.matched_by_phone,
    )
    assert promised.to_create == done.created
    # The cases above, as the run resolved them.
    assert done.quarantined == 0
    assert done.matched_by_phone == 1 and done.matched_by_email == scenario.DEV_REREGISTERED + 1
    assert {m.source_id for m in done.mapped} >= {spaced["id"], mapped["id"]}
    created = {
        row[0]
        for row in sql(
            target, "SELECT id FROM auth.users WHERE id = ANY(%s)", [dashed["id"], deleted["id"], sso["id"]]
        )
    }
    assert created == {dashed["id"], deleted["id"], sso["id"]}


def test_plan_counts_the_users_the_run_sets_aside(
    seed_dbs: tuple[Database, Database], seed: scenario.Scenario
) -> None:
    source, target = seed_dbs
    fresh = new_production_users(seed)
    # Two production accounts on one development account's address (different case): the run
    # matches the earlier one and quarantines the other, and the plan says so beforehand.
    address = dev_account(seed, "qa1@ultima.dev")["email"]
    sql(source, "UPDATE auth.users SET email = %s WHERE id = %s", address, fresh[0]["id"])
    sql(source, "UPDATE auth.users SET email = %s WHERE id = %s", address.upper(), fresh[1]["id"])

    planned = CliRunner().invoke(
        main, ["plan", "--source", source.url, "--target", target.url, "--mapping", SHIPPED, "--json"]
    )
    assert planned.exit_code == 0, planned.output
    promised = PlanReport.model_validate_json(planned.stdout).users
    ran = CliRunner().invoke(
        main, ["run", "--auth-only", "--source", source.url, "--target", target.url, "--json"]
    )
    done = AuthReport.model_validate_json(ran.stdout)

    assert promised is not None
    assert promised.set_aside == done.quarantined == 1
    assert (
        promised.matched_by_id
        + promised.matched_by_email
        + promised.matched_by_phone
        + promised.to_create
        + promised.set_aside
    ) == promised.source
