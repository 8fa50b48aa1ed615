"""A refused command writes nothing anywhere: the preflight checks both sides before the first write.

Each refusal is one line on stderr and exit 2, and both databases dump byte for byte as before.
"""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from click.testing import CliRunner
from queries import execute, fetch
from unchanged import unchanged

from devkit import testbed
from devkit.embedded import Server
from sync.cli import main
from sync.state import CaughtUpTo, begin_run, catch_up_since, catch_up_xmin, ensure_state

NOTES = """
CREATE TABLE public.notes (
    id uuid PRIMARY KEY,
    user_id uuid REFERENCES auth.users (id),
    body text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
"""
PLAIN_NOTES = NOTES.replace(" REFERENCES auth.users (id)", "")


def sync(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, list(args), env=env)


def between(source: testbed.Database | str, target: testbed.Database | str, mapping) -> list[str]:
    src = source if isinstance(source, str) else source.url
    tgt = target if isinstance(target, str) else target.url
    return ["--source", src, "--target", tgt, "--mapping", str(mapping)]


@pytest.fixture
def mapping(tmp_path):
    path = tmp_path / "sync.toml"
    path.write_text("# defaults for every table\n")
    return path


@pytest.fixture
def pair(make_db) -> tuple[testbed.Database, testbed.Database]:
    """Two Supabase-shaped databases with the same small app table; production has a user and a note."""
    source, target = make_db(), make_db()
    for db in (source, target):
        execute(db.admin_url, NOTES)
    user = uuid.uuid4()
    execute(
        source.admin_url,
        "INSERT INTO auth.users (id, email, encrypted_password, created_at, updated_at) "
        "VALUES (%s, 'ana@example.com', '', now(), now())",
        user,
    )
    execute(
        source.admin_url,
        "INSERT INTO public.notes (id, user_id, body) VALUES (%s, %s, 'hola')",
        uuid.uuid4(),
        user,
    )
    return source, target


@pytest.fixture
def role(server: Server) -> Iterator[callable]:
    """Factory of login roles (cluster-wide), granted what the test says in the databases it names."""
    made: list[tuple[str, list[testbed.Database]]] = []

    def make(dbs: list[testbed.Database], grants: str, attributes: str = "") -> str:
        name = f"r_{uuid.uuid4().hex[:10]}"
        execute(server.url, f"CREATE ROLE {name} LOGIN PASSWORD 'pw' {attributes}")
        made.append((name, dbs))
        for db in dbs:
            execute(
                db.admin_url, f"GRANT CONNECT ON DATABASE {db.name} TO {name};" + grants.format(role=name)
            )
        return name

    yield make
    for name, dbs in made:
        for db in dbs:
            execute(db.admin_url, f"DROP OWNED BY {name}")
        execute(server.url, f"DROP ROLE {name}")


def as_role(server: Server, db: testbed.Database, name: str) -> str:
    return server.database_url(db.name, name, "pw")


def refused(result, *fragments: str) -> str:
    """The one line a refused command printed, checked for its exit code and for ``fragments``."""
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.strip().endswith(errors[0]), result.stderr
    for fragment in fragments:
        assert fragment in errors[0]
    assert "Traceback" not in result.output
    return errors[0]


WRITER_GRANTS = (
    "GRANT USAGE ON SCHEMA public, auth TO {role};"
    "GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public, auth TO {role};"
)


# ---------------------------------------------------------------------------------- source ≠ target


def test_the_same_database_as_source_and_target_is_refused_for_plan_and_run(pair, mapping):
    source, _ = pair
    for command in ("plan", "run"):
        with unchanged(source):
            result = sync(command, *between(source, source, mapping))
        refused(result, "--source and --target are the same database")


def test_the_same_database_spelled_two_ways_is_refused(pair, mapping, server):
    source, _ = pair
    info = asyncio.run(_host_port(source.url))
    other_spelling = f"host=localhost port={info[1]} dbname={source.name} user=postgres password=postgres"
    with unchanged(source):
        result = sync("run", "--since", "2024-01-01", *between(source, other_spelling, mapping))
    line = refused(result, "are the same database")
    assert "postgres@localhost" in line and "password" not in line.replace("passwords", "")


def test_only_pg_variables_make_both_sides_the_same_database_and_that_is_refused(pair, mapping, server):
    source, _ = pair
    host, port = asyncio.run(_host_port(source.url))
    env = {
        "PGHOST": host,
        "PGPORT": str(port),
        "PGUSER": "postgres",
        "PGPASSWORD": "postgres",
        "PGDATABASE": source.name,
        "SYNC_SOURCE_URL": "",
        "SYNC_TARGET_URL": "",
    }
    with unchanged(source):
        result = sync("run", "--mapping", str(mapping), env=env)
    refused(result, "the same database")


async def _host_port(url: str) -> tuple[str, int]:
    conn = await asyncpg.connect(url)
    try:
        return conn._addr[0], conn._addr[1]  # the address the URL resolved to
    finally:
        await conn.close()


# ------------------------------------------------------------------------------------------- shapes


def test_a_source_without_an_auth_schema_is_refused_naming_the_source(make_db, pair, mapping):
    plain = make_db("template0")
    execute(plain.url, PLAIN_NOTES)
    _, target = pair
    with unchanged(plain, target):
        result = sync("run", "--since", "2024-01-01", *between(plain, target, mapping))
    refused(result, "The source database has no auth schema", "--skip-auth")


def test_a_target_with_app_tables_but_no_auth_schema_is_refused_naming_the_target(make_db, pair, mapping):
    source, _ = pair
    plain = make_db("template0")
    execute(plain.url, PLAIN_NOTES)
    for command in ("plan", "run"):
        with unchanged(source, plain):
            result = sync(command, *between(source, plain, mapping))
        refused(result, "The target database has no auth schema")


def test_plain_postgresql_on_both_sides_copies_the_tables_and_says_users_are_left_out(make_db, mapping):
    source, target = make_db("template0"), make_db("template0")
    for db in (source, target):
        execute(db.url, PLAIN_NOTES)
    execute(
        source.url,
        "INSERT INTO public.notes (id, body) VALUES (%s, 'uno'), (%s, 'dos')",
        uuid.uuid4(),
        uuid.uuid4(),
    )
    plan = sync("plan", *between(source, target, mapping))
    assert plan.exit_code == 0, plan.output
    assert "no auth schema on either side: users are not part of this sync" in plan.output
    result = sync("run", "--since", "2024-01-01", *between(source, target, mapping))
    assert result.exit_code == 0, result.output
    assert "no auth schema on either side: users are not part of this sync" in result.stderr
    assert "source: postgres@" in result.stderr and f"/{source.name} (PostgreSQL " in result.stderr
    assert fetch(target.url, "SELECT count(*) FROM public.notes")[0][0] == 2


# --------------------------------------------------------------------------------------- privileges


def test_a_target_role_that_cannot_write_auth_users_is_refused_before_anything_is_created(
    pair, mapping, role, server
):
    source, target = pair
    name = role(
        [target],
        "GRANT USAGE ON SCHEMA public, auth TO {role};"
        "GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO {role};"
        "GRANT SELECT ON ALL TABLES IN SCHEMA auth TO {role};"
        "GRANT CREATE ON DATABASE " + target.name + " TO {role};",
        "BYPASSRLS",
    )
    with unchanged(source, target):
        result = sync(
            "run", "--since", "2024-01-01", *between(source, as_role(server, target, name), mapping)
        )
    refused(result, f"GRANT INSERT, UPDATE ON auth.identities TO {name}", "auth.users")
    assert not fetch(target.admin_url, "SELECT to_regnamespace('_sync') IS NOT NULL")[0][0]


def test_a_target_role_without_create_on_the_database_is_told_what_to_grant(pair, mapping, role, server):
    source, target = pair
    name = role([target], WRITER_GRANTS, "BYPASSRLS")
    with unchanged(source, target):
        result = sync(
            "run", "--since", "2024-01-01", *between(source, as_role(server, target, name), mapping)
        )
    refused(result, f"GRANT CREATE ON DATABASE {target.name} TO {name}")


def test_a_read_only_target_is_refused_with_exit_2(pair, mapping, role, server):
    source, target = pair
    name = role([target], WRITER_GRANTS + f"GRANT CREATE ON DATABASE {target.name} TO {{role}};", "BYPASSRLS")
    execute(server.url, f"ALTER ROLE {name} SET default_transaction_read_only = on")
    with unchanged(source, target):
        result = sync(
            "run", "--since", "2024-01-01", *between(source, as_role(server, target, name), mapping)
        )
    refused(result, "The target database is read-only", "default_transaction_read_only")


def test_a_source_role_limited_by_row_level_security_is_refused_by_plan_and_run(pair, mapping, role, server):
    source, target = pair
    name = role([source], "GRANT pg_read_all_data TO {role};")
    for command in ("plan", "run"):
        with unchanged(source, target):
            result = sync(command, *between(as_role(server, source, name), target, mapping))
        refused(result, "Row level security hides rows of auth.identities, auth.users", "BYPASSRLS")


COUNTERS = "CREATE TABLE public.counters (id bigserial PRIMARY KEY, note uuid REFERENCES public.notes)"


def test_a_target_role_that_may_not_set_the_runs_sequences_is_refused_before_anything_is_written(
    pair, mapping, role, server
):
    source, target = pair
    for db in (source, target):
        execute(db.admin_url, COUNTERS)
    execute(source.admin_url, "INSERT INTO public.counters (note) SELECT id FROM public.notes")
    # Every table privilege, but not the sequence the run moves past the copied keys.
    name = role([target], WRITER_GRANTS + f"GRANT CREATE ON DATABASE {target.name} TO {{role}};", "BYPASSRLS")
    mapping.write_text('[tables."public.counters"]\nkey = "preserve"\n')
    for command in ("plan", "run"):  # the plan refuses what the run would
        with unchanged(source, target):
            result = sync(
                command, "--since", "2024-01-01", *between(source, as_role(server, target, name), mapping)
            )
        refused(result, f"GRANT USAGE, UPDATE ON SEQUENCE public.counters_id_seq TO {name}")
    execute(target.admin_url, f"GRANT USAGE, UPDATE ON SEQUENCE public.counters_id_seq TO {name}")
    granted = sync("run", "--since", "2024-01-01", *between(source, as_role(server, target, name), mapping))
    assert granted.exit_code == 0, granted.output
    assert fetch(target.url, "SELECT last_value FROM public.counters_id_seq")[0][0] == 1


def test_a_privilege_missing_late_exits_2_and_says_what_to_grant(pair, mapping, role, server):
    source, target = pair
    # A target trigger writes to a table the role may not write: the run meets it at the first batch.
    execute(
        target.admin_url,
        "CREATE TABLE public.audit (note uuid);"
        "CREATE FUNCTION public.audit_note() RETURNS trigger LANGUAGE plpgsql AS "
        "$$BEGIN INSERT INTO public.audit VALUES (NEW.id); RETURN NEW; END$$;"
        "CREATE TRIGGER audited AFTER INSERT ON public.notes "
        "FOR EACH ROW EXECUTE FUNCTION public.audit_note();",
    )
    name = role([target], WRITER_GRANTS + f"GRANT CREATE ON DATABASE {target.name} TO {{role}};", "BYPASSRLS")
    execute(target.admin_url, f"REVOKE INSERT ON public.audit FROM {name}")
    result = sync("run", "--since", "2024-01-01", *between(source, as_role(server, target, name), mapping))
    line = refused(result, "permission denied for table audit", "grant the privilege")
    assert "rerun" not in line
    shown = sync("status", "--target", target.url)
    assert "failed: permission denied for table audit" in shown.output


# ----------------------------------------------------------------------------------------- sources


def test_a_run_never_resumes_or_catches_up_from_a_run_that_read_another_source(supabase_db):
    async def story() -> None:
        conn = await asyncpg.connect(supabase_db.url)
        try:
            await ensure_state(conn)
            first = await begin_run(conn, None, restart=False, options={}, source="system 1/postgres")
            await conn.execute(
                "UPDATE _sync.runs SET status = 'succeeded', finished_at = now(), high_water = $2, "
                "snapshot_xmin = 7777 WHERE id = $1",
                first.id,
                datetime(2024, 11, 18, tzinfo=UTC),
            )
            unfinished = await begin_run(conn, None, restart=False, options={}, source="system 1/postgres")
            await conn.execute("UPDATE _sync.runs SET status = 'failed' WHERE id = $1", unfinished.id)
            other = await begin_run(conn, None, restart=False, options={}, source="system 2/postgres")
            assert not other.resumed and other.id != unfinished.id
            assert await catch_up_since(conn, timedelta(0), "system 2/postgres") is None
            assert await catch_up_xmin(conn, "system 2/postgres") is None
            assert await catch_up_xmin(conn, "system 1/postgres") == CaughtUpTo(7777, None)
            assert await catch_up_since(conn, timedelta(0), "system 1/postgres") == datetime(
                2024, 11, 18, tzinfo=UTC
            )
            again = await begin_run(conn, None, restart=False, options={}, source="system 1/postgres")
            assert again.resumed and again.id == unfinished.id
            recorded = await conn.fetchval(
                "SELECT options->>'source' FROM _sync.runs WHERE id = $1", other.id
            )
            assert recorded == "system 2/postgres"
        finally:
            await conn.close()

    asyncio.run(story())


def test_a_run_records_the_source_it_read(pair, mapping):
    source, target = pair
    result = sync("run", "--since", "2024-01-01", *between(source, target, mapping))
    assert result.exit_code == 0, result.output
    recorded = fetch(target.url, "SELECT options->>'source' FROM _sync.runs")[0][0]
    assert recorded.endswith(f"/{source.name}")


# -------------------------------------------------------------------------------------- plan = run


def test_a_future_since_is_refused_by_plan_and_run(pair, mapping):
    source, target = pair
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    for command in ("plan", "run"):
        with unchanged(source, target):
            result = sync(command, "--since", tomorrow, *between(source, target, mapping))
        assert result.exit_code == 2, result.output
        assert f"{tomorrow} is in the future: no row has changed since then" in result.stderr


def test_plan_without_since_plans_the_catch_up_the_run_would_do_and_says_so(pair, mapping):
    source, target = pair
    first = sync("plan", *between(source, target, mapping))
    assert first.exit_code == 0, first.output
    assert "window: whole tables (no --since and no earlier run: what `sync run` would copy)" in first.output
    assert sync("run", "--since", "2024-01-01", *between(source, target, mapping)).exit_code == 0
    (mark,) = fetch(target.url, "SELECT high_water - interval '10 minutes' FROM _sync.runs")[0]
    after = sync("plan", *between(source, target, mapping))
    assert after.exit_code == 0, after.output
    assert (
        f"window: catch-up from the last run, rows whose since-column is at or after {mark.isoformat()} "
        "or that a transaction wrote since that run (what `sync run` without --since would copy)"
    ) in after.output


def test_a_catch_up_plan_counts_the_edits_the_run_then_reads_whatever_their_clock_says(pair, mapping):
    source, target = pair
    execute(source.admin_url, "UPDATE public.notes SET updated_at = '2024-06-01'")
    assert sync("run", "--since", "2024-01-01", *between(source, target, mapping)).exit_code == 0
    # An edit that leaves updated_at alone: only the transaction that wrote it tells.
    execute(source.admin_url, "UPDATE public.notes SET body = 'editada'")

    shown = sync("plan", "--json", *between(source, target, mapping))
    ran = sync("run", "--json", *between(source, target, mapping))

    assert shown.exit_code == 0 and ran.exit_code == 0, shown.output + ran.output
    planned = {t["name"]: t["window_rows"] + t["parent_rows"] for t in json.loads(shown.stdout)["tables"]}
    read = {t["table"]: t["read"] for t in json.loads(ran.stdout)["tables"]}
    assert planned == read == {"public.notes": 1}
    assert fetch(target.url, "SELECT body FROM public.notes")[0][0] == "editada"


def test_verify_names_both_sides_and_refuses_the_same_database(pair, mapping):
    source, target = pair
    shown = sync("verify", *between(source, target, mapping))
    assert "source: postgres@" in shown.output and f"/{source.name} (PostgreSQL " in shown.output
    assert f"/{target.name} (PostgreSQL " in shown.output and ", direct)" in shown.output
    with unchanged(source):
        result = sync("verify", *between(source, source, mapping))
    refused(result, "--source and --target are the same database")


# ---------------------------------------------------------------------------------------- admin API


def test_an_unreachable_auth_server_in_admin_api_mode_is_refused_before_anything_is_written(pair, mapping):
    source, target = pair
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    api = [
        "--auth-mode",
        "admin-api",
        "--supabase-url",
        f"http://127.0.0.1:{port}",
        "--service-role-key",
        "k",
    ]
    for command in (["run", "--since", "2024-01-01"], ["run", "--auth-only"]):
        with unchanged(source, target):
            result = sync(*command, *api, *between(source, target, mapping))
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert lines[-1] == (
            f"error: The Auth server at http://127.0.0.1:{port} did not answer (All connection attempts "
            "failed): check --supabase-url."
        ), result.stderr
        assert len(lines) < 10 and "Traceback" not in result.stderr, result.stderr  # a few retries at most
