"""`sync plan` on the seed scenario: the month's gap, counted, in the order a run would copy it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import asyncpg
import psycopg
from click.testing import CliRunner
from psycopg import sql

from devkit import scenario
from sync.cli import main
from sync.plan import PlanReport

PROJECT = Path(__file__).resolve().parent.parent
SHIPPED = str(PROJECT / "mappings" / "sync.toml")
ORDER = ["public.profiles", "public.bank_profiles", "public.financing_requests", "public.documents"]


def in_window(seed: scenario.Scenario, since: datetime) -> dict[str, int]:
    """Production rows created or edited at or after ``since``, per table."""
    return {
        f"public.{table}": sum(1 for row in rows if row["updated_at"] >= since)
        for table, rows in seed.production.rows.items()
    }


def plan(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, ["plan", *args], env=env)


def plan_of(seed_dbs, *args: str):
    source, target = seed_dbs
    return plan("--source", source.url, "--target", target.url, *args)


def test_plan_lists_the_months_gap_parents_first_with_counts_equal_to_what_production_gained(seed_dbs, seed):
    result = plan_of(seed_dbs, "--mapping", SHIPPED, "--since", "2024-11-18")

    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "window: rows whose since-column is at or after 2024-11-18T00:00:00+00:00" in out
    lines = out.splitlines()
    start = lines.index("tables, parents first")
    rows = lines[start + 1 : start + 1 + len(ORDER)]
    assert [row.split()[1] for row in rows] == ORDER
    expected = in_window(seed, scenario.COPY_DATE)
    for row, table in zip(rows, ORDER, strict=True):
        assert f"{expected[table]:,} rows in the window" in row
    # Development's test rows took the keys production's new rows have: one collision per test row.
    for table, taken in scenario.DEV_TEST_ROWS.items():
        row = rows[ORDER.index(f"public.{table}")]
        assert f"{taken * seed.scale:,} of their keys taken by other rows in target" in row
    new_users = scenario.PROD_USERS - scenario.PRE_COPY_USERS
    assert (
        f"users: 4,082 in source, 1,133 in target: {new_users - scenario.DEV_REREGISTERED:,} to create, "
        f"1,125 matched by id, {scenario.DEV_REREGISTERED} by e-mail (remapped), 0 by phone"
    ) in out
    for drift in (
        "public.profiles: column full_name renamed to display_name",
        "public.profiles: new column onboarding_step: inserted rows get its default 0",
        "public.financing_requests: new column channel: inserted rows get its default 'web'::text",
        "public.notifications exists only in target: left alone",
        "enum public.request_status gained 'under_review' in target",
    ):
        assert f"  - {drift}" in out
    assert "auth.users: on_auth_user_created AFTER INSERT → public.handle_new_user()" in out
    assert "public.profiles: since-column updated_at has no index in source" in out
    assert result.stderr == ""


def test_json_output_validates_and_carries_the_same_numbers(seed_dbs, seed, monkeypatch):
    source, target = seed_dbs
    monkeypatch.chdir(PROJECT)  # mappings/sync.toml is found without --mapping
    keywords = psycopg.conninfo.make_conninfo(**psycopg.conninfo.conninfo_to_dict(source.url))
    env = {"SYNC_SOURCE_URL": keywords, "SYNC_TARGET_URL": target.url}  # key=value works as a URL does

    result = plan("--since", "2024-11-18", "--json", env=env)

    assert result.exit_code == 0, result.output
    report = PlanReport.model_validate_json(result.stdout)
    assert report.since == datetime(2024, 11, 18, tzinfo=UTC)
    assert report.mapping == str(Path("mappings") / "sync.toml")
    assert [t.name for t in report.tables] == ORDER
    assert {t.name: t.window_rows for t in report.tables} == in_window(seed, scenario.COPY_DATE)
    assert {t.name: t.collisions for t in report.tables if t.key == "remap"} == {
        f"public.{t}": n for t, n in scenario.DEV_TEST_ROWS.items()
    }
    assert report.users is not None
    assert (report.users.matched_by_id, report.users.matched_by_email, report.users.to_create) == (
        1125,
        5,
        2952,
    )
    assert report.errors == []


def test_since_takes_an_instant_with_its_offset_and_counts_from_there(seed_dbs, seed):
    result = plan_of(seed_dbs, "--mapping", SHIPPED, "--since", "2024-12-01T09:30:00-06:00", "--json")

    assert result.exit_code == 0, result.output
    report = PlanReport.model_validate_json(result.stdout)
    since = datetime(2024, 12, 1, 9, 30, tzinfo=timezone(timedelta(hours=-6)))
    assert report.since == since
    assert {t.name: t.window_rows for t in report.tables} == in_window(seed, since)


def test_without_since_whole_tables_are_counted(seed_dbs, seed):
    result = plan_of(seed_dbs, "--mapping", SHIPPED, "--json")

    assert result.exit_code == 0, result.output
    report = PlanReport.model_validate_json(result.stdout)
    assert report.since is None
    assert {t.name: t.window_rows for t in report.tables} == {
        f"public.{t}": len(rows) for t, rows in seed.production.rows.items()
    }


def test_a_plan_that_would_lose_data_exits_2_naming_the_column_and_the_fix(seed_dbs, tmp_path):
    empty = tmp_path / "empty.toml"
    empty.write_text("")

    result = plan_of(seed_dbs, "--mapping", str(empty), "--since", "2024-11-18")

    assert result.exit_code == 2
    assert (
        '  - public.profiles.full_name exists only in source: add ignore = ["full_name"] or '
        'rename = { full_name = "..." } under [tables."public.profiles"]'
    ) in result.stdout
    assert "error: the plan has 1 problem(s) that would lose data; nothing was written." in result.stderr

    as_json = plan_of(seed_dbs, "--mapping", str(empty), "--json")
    assert as_json.exit_code == 2
    assert PlanReport.model_validate_json(as_json.stdout).errors[0].startswith("public.profiles.full_name")


def test_a_malformed_mapping_is_one_line_naming_file_table_and_key(seed_dbs, tmp_path):
    bad = tmp_path / "sync.toml"
    bad.write_text('[tables."public.documents"]\nkey = "remapp"\n')

    result = plan_of(seed_dbs, "--mapping", str(bad))

    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {bad}: tables.\"public.documents\".key: 'remapp' is not one of preserve, remap, natural\n"
    )
    assert "Traceback" not in result.output


def test_an_unknown_host_is_one_line_naming_the_source_without_the_password(seed_dbs):
    _, target = seed_dbs
    secret = "Sup3r-Secret-pw"

    result = plan(
        "--source", f"postgresql://postgres:{secret}@db.nowhere.invalid:5432/postgres", "--target", target.url
    )

    assert result.exit_code == 2
    assert result.stderr.startswith("error: Cannot reach the source database at postgres@db.nowhere.invalid")
    assert len(result.stderr.strip().splitlines()) == 1
    assert secret not in result.output and "Traceback" not in result.output


def test_a_refused_password_is_one_line_naming_the_target_without_the_password(seed_dbs):
    source, target = seed_dbs
    secret = "not-the-Passw0rd"
    wrong = target.url.replace("postgres:postgres@", f"postgres:{secret}@")

    result = plan("--source", source.url, "--target", wrong)

    assert result.exit_code == 2
    assert result.stderr == (
        "error: The target database refused the login for user 'postgres': check the user and password.\n"
    )
    assert secret not in result.output


def test_a_date_that_is_not_one_is_a_usage_error():
    result = plan(
        "--source",
        "postgresql://x@127.0.0.1:1/x",
        "--target",
        "postgresql://x@127.0.0.1:1/x",
        "--since",
        "last week",
    )

    assert result.exit_code == 2
    assert "'last week' is not a date (2024-11-18) or an ISO 8601 instant" in result.output


# ------------------------------------------------------------------------------------------ writes nothing


def fingerprint(url: str) -> dict[str, object]:
    """The catalog and every row, sequence value and schema of a database, as checksums."""
    with psycopg.connect(url) as conn:
        catalog = conn.execute(
            """
            SELECT md5(string_agg(x, '|' ORDER BY x)) FROM (
                SELECT format('%s %s %s', c.oid::regclass, c.relkind, c.relowner) AS x
                FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
                WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
                UNION ALL
                SELECT format('%s %s %s %s', a.attrelid::regclass, a.attname, a.atttypid::regtype,
                              a.attnotnull)
                FROM pg_attribute AS a JOIN pg_class AS c ON c.oid = a.attrelid
                JOIN pg_namespace AS n ON n.oid = c.relnamespace
                WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') AND a.attnum > 0
                UNION ALL SELECT format('%s %s', conname, pg_get_constraintdef(oid)) FROM pg_constraint
                UNION ALL SELECT format('%s %s %s', tgname, tgenabled, tgfoid) FROM pg_trigger
                UNION ALL SELECT nspname FROM pg_namespace
            ) AS everything
            """
        ).fetchone()
        tables = conn.execute(
            "SELECT schemaname, tablename FROM pg_tables "
            "WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
        ).fetchall()
        rows = {
            f"{schema}.{table}": conn.execute(
                sql.SQL(
                    "SELECT count(*), md5(string_agg(t::text, '|' ORDER BY t::text)) FROM {}.{} AS t"
                ).format(sql.Identifier(schema), sql.Identifier(table))
            ).fetchone()
            for schema, table in tables
        }
        sequences = conn.execute("SELECT schemaname, sequencename, last_value FROM pg_sequences").fetchall()
    return {"catalog": catalog, "rows": rows, "sequences": sorted(sequences)}


def test_sync_plan_leaves_both_databases_exactly_as_they_were(seed_dbs, tmp_path):
    source, target = seed_dbs
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    before = fingerprint(source.admin_url), fingerprint(target.admin_url)

    runs = [
        plan_of(seed_dbs, "--mapping", SHIPPED, "--since", "2024-11-18"),
        plan_of(seed_dbs, "--mapping", SHIPPED, "--json"),
        plan_of(seed_dbs, "--mapping", str(empty)),  # a plan with errors stops just the same
    ]

    assert [r.exit_code for r in runs] == [0, 0, 2]
    assert (fingerprint(source.admin_url), fingerprint(target.admin_url)) == before
    assert before[1]["rows"]["public.profiles"][0] == 1133


def test_every_transaction_sync_plan_opens_is_read_only(seed_dbs, monkeypatch):
    statements: list[str] = []
    original = asyncpg.connection.Connection.execute

    async def recording(self, query: str, *args, **kwargs):
        statements.append(query)
        return await original(self, query, *args, **kwargs)

    monkeypatch.setattr(asyncpg.connection.Connection, "execute", recording)

    result = plan_of(seed_dbs, "--mapping", SHIPPED, "--since", "2024-11-18")

    assert result.exit_code == 0, result.output
    begins = [s for s in statements if s.upper().startswith("BEGIN")]
    assert len(begins) >= 2  # one per database at least
    # One target transaction holds the source's keys for the production deletes in a temporary table,
    # and is rolled back: nothing else is created, and nothing is ever committed.
    writable = [s for s in begins if "READ ONLY" not in s.upper()]
    assert len(writable) == 1, begins
    creates = [s for s in statements if "CREATE" in s.upper()]
    assert creates and all("CREATE TEMP TABLE" in s and "ON COMMIT DROP" in s for s in creates), creates
    assert not [
        s for s in statements if s.strip().upper().startswith(("COMMIT", "INSERT", "UPDATE", "DELETE"))
    ]


def test_the_plan_says_what_a_transaction_pooler_costs():
    from sync.connect import Endpoint, Side
    from sync.preview import connection_warnings

    pooled = "postgresql://postgres.abc:pw@aws-0-eu-west-1.pooler.supabase.com:6543/postgres"
    session = "postgresql://postgres.abc:pw@aws-0-eu-west-1.pooler.supabase.com:5432/postgres"
    warnings = connection_warnings(Endpoint.parse(Side.SOURCE, pooled), Endpoint.parse(Side.TARGET, pooled))
    assert "cannot share one snapshot" in warnings[0] and "run lock" in warnings[1]
    direct = Endpoint.parse(Side.SOURCE, session), Endpoint.parse(Side.TARGET, session)
    assert connection_warnings(*direct) == []


def test_the_plan_counts_what_the_run_then_reads_window_and_parents_apart(seed_dbs):
    source, target = seed_dbs
    shown = plan_of(seed_dbs, "--mapping", SHIPPED, "--since", "2024-11-18", "--json")
    assert shown.exit_code == 0, shown.output
    planned = {
        t.name: (t.window_rows, t.parent_rows) for t in PlanReport.model_validate_json(shown.stdout).tables
    }
    assert any(parents for _, parents in planned.values()), planned  # the seed's window needs old parents

    endpoints = ["--source", source.url, "--target", target.url, "--mapping", SHIPPED]
    ran = CliRunner().invoke(main, ["run", *endpoints, "--since", "2024-11-18", "--json"])

    assert ran.exit_code == 0, ran.output
    tables = json.loads(ran.stdout)["tables"]
    assert {t["table"]: (t["read"] - t["parents"], t["parents"]) for t in tables} == planned
    text = plan_of(seed_dbs, "--mapping", SHIPPED, "--since", "2024-11-18").stdout
    window, parents = planned["public.profiles"]
    assert f"{window:,} rows in the window + {parents:,} parents the window needs" in text
