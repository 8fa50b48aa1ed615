"""`sync run --since 2024-11-18` on the seed scenario closes the gap completely, and only once."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import timedelta

import asyncpg
import bcrypt
import psycopg
import pytest
from admin_api_server import AdminApiServer
from click.testing import CliRunner
from queries import SEED_APP_TABLES, SEED_MAPPING, execute, fetch, seed_run_args, seed_sync
from test_verify import problems, verify

from devkit import scenario
from sync.auth import AuthOptions
from sync.cli import main
from sync.connect import Endpoint, Side, connect
from sync.mapping import load_mapping
from sync.run import RunOptions, auth_import, run_sync
from sync.state import ensure_state

APP = SEED_APP_TABLES


def sync_run(source, target, **options):
    return seed_sync(source, target, **{"since": scenario.COPY_DATE, **options})


def checksums(url: str) -> dict[str, str]:
    tables = ("auth.users", *APP, "public.notifications")
    with psycopg.connect(url) as conn:
        return {
            t: conn.execute(
                f"SELECT md5(coalesce(string_agg(x::text, '|' ORDER BY x::text), '')) FROM {t} AS x"
            ).fetchone()[0]
            for t in tables
        }


@pytest.fixture
def synced(seed_dbs):
    source, target = seed_dbs
    before = {t: fetch(target.url, f"SELECT count(*) FROM {t}")[0][0] for t in (*APP, "public.notifications")}
    report = sync_run(source, target)
    return source, target, report, before


def test_every_production_row_arrives_and_development_rows_stay(synced):
    source, target, report, before = synced
    assert report.exit_code == 0, report.to_json()
    # Every production user and profile, matched by id or by e-mail.
    assert fetch(target.url, "SELECT count(*) FROM auth.users")[0][0] == 4082 + scenario.DEV_TESTERS
    for table in ("public.financing_requests", "public.bank_profiles", "public.documents"):
        prod = fetch(source.url, f"SELECT count(*) FROM {table}")[0][0]
        dev_only = scenario.DEV_TEST_ROWS[table.split(".")[1]]
        assert fetch(target.url, f"SELECT count(*) FROM {table}")[0][0] == prod + dev_only, table
    assert (
        fetch(target.url, "SELECT count(*) FROM public.notifications")[0][0] == before["public.notifications"]
    )


def test_no_row_points_at_a_missing_parent(synced):
    _, target, _, _ = synced
    orphans = fetch(
        target.url,
        """
        SELECT (SELECT count(*) FROM public.profiles p
                WHERE NOT EXISTS (SELECT 1 FROM auth.users u WHERE u.id = p.id))
             + (SELECT count(*) FROM public.financing_requests r
                WHERE NOT EXISTS (SELECT 1 FROM public.profiles p WHERE p.id = r.profile_id))
             + (SELECT count(*) FROM public.documents d WHERE d.request_id IS NOT NULL
                AND NOT EXISTS (SELECT 1 FROM public.financing_requests r WHERE r.id = d.request_id))
    """,
    )
    assert orphans == [(0,)]


def test_production_edits_land_in_common_columns_and_development_columns_keep_their_values(seed_dbs):
    source, target = seed_dbs
    dev_risk = dict(
        fetch(target.url, "SELECT id, risk_score FROM public.financing_requests WHERE risk_score IS NOT NULL")
    )
    assert sync_run(source, target).exit_code == 0
    prod_status = dict(
        fetch(
            source.url,
            "SELECT id, status::text FROM public.financing_requests "
            "WHERE created_at < %s AND updated_at >= %s",
            scenario.COPY_DATE,
            scenario.COPY_DATE,
        )
    )
    assert len(prod_status) == 44
    now = dict(fetch(target.url, "SELECT id, status::text FROM public.financing_requests"))
    assert all(now[k] == v for k, v in prod_status.items())
    after = dict(
        fetch(target.url, "SELECT id, risk_score FROM public.financing_requests WHERE risk_score IS NOT NULL")
    )
    assert after == dev_risk
    renamed = fetch(source.url, "SELECT id, full_name FROM public.profiles ORDER BY id LIMIT 50")
    target_names = dict(fetch(target.url, "SELECT id, display_name FROM public.profiles"))
    assert all(target_names[i] == name for i, name in renamed if i in target_names)


def test_colliding_development_rows_are_intact_and_production_rows_remapped_with_their_documents(seed_dbs):
    source, target = seed_dbs
    dev_rows = fetch(
        target.url,
        "SELECT id, profile_id, amount, created_at FROM public.financing_requests WHERE id > 871 ORDER BY id",
    )
    assert sync_run(source, target).exit_code == 0
    assert (
        fetch(
            target.url,
            "SELECT id, profile_id, amount, created_at FROM public.financing_requests "
            "WHERE id = ANY(%s) ORDER BY id",
            [r[0] for r in dev_rows],
        )
        == dev_rows
    )
    mapped = fetch(
        target.url,
        "SELECT source_key, target_key FROM _sync.id_map WHERE table_name = 'public.financing_requests'",
    )
    assert len(mapped) == scenario.DEV_TEST_ROWS["financing_requests"]
    # A production document of a remapped request points at the request's new key, with the same content.
    for source_key, target_key in mapped:
        prod_docs = fetch(
            source.url,
            "SELECT storage_path FROM public.documents WHERE request_id = %s ORDER BY 1",
            int(source_key),
        )
        dev_docs = fetch(
            target.url,
            "SELECT storage_path FROM public.documents WHERE request_id = %s ORDER BY 1",
            int(target_key),
        )
        assert prod_docs == [d for d in dev_docs if d in prod_docs]
        prod_row = fetch(
            source.url,
            "SELECT amount, created_at FROM public.financing_requests WHERE id = %s",
            int(source_key),
        )
        assert (
            fetch(
                target.url,
                "SELECT amount, created_at FROM public.financing_requests WHERE id = %s",
                int(target_key),
            )
            == prod_row
        )


def test_sequences_are_ahead_of_every_key(synced):
    _, target, _, _ = synced
    for table in ("financing_requests", "bank_profiles", "documents"):
        ahead = fetch(
            target.url,
            f"SELECT nextval(pg_get_serial_sequence('public.{table}', 'id')) "
            f"> (SELECT max(id) FROM public.{table})",
        )
        assert ahead == [(True,)], table


def test_reregistered_people_log_in_with_their_production_password(synced, seed: scenario.Scenario):
    _, target, _, _ = synced
    for email in seed.reregistered_emails:
        rows = fetch(target.url, "SELECT encrypted_password FROM auth.users WHERE lower(email) = %s", email)
        assert len(rows) == 1, email
        assert bcrypt.checkpw(scenario.password_for(email).encode(), rows[0][0].encode())


def test_a_second_run_changes_nothing(synced):
    source, target, _, _ = synced
    before = checksums(target.url)
    again = sync_run(source, target)
    assert again.exit_code == 0
    assert sum(t.written for t in again.tables) == 0
    assert again.auth is not None and again.auth.created == 0
    assert checksums(target.url) == before


def test_a_row_the_development_check_rejects_is_quarantined_and_everything_else_lands(seed_dbs):
    source, target = seed_dbs
    profile = fetch(
        source.url, "SELECT id FROM public.profiles WHERE created_at > %s LIMIT 1", scenario.COPY_DATE
    )
    with psycopg.connect(source.url) as conn:
        conn.execute(
            "INSERT INTO public.financing_requests (profile_id, amount, term_months, created_at, "
            "updated_at) VALUES (%s, 1000, 120, '2024-12-10', '2024-12-10')",
            (profile[0][0],),
        )
    result = CliRunner().invoke(
        main,
        seed_run_args(source, target, "--json"),
    )
    assert result.exit_code == 3, result.output
    report = json.loads(result.stdout)
    assert {t["table"]: t["quarantined"] for t in report["tables"]}["public.financing_requests"] == 1
    error = fetch(target.url, "SELECT error FROM _sync.quarantine")[0][0]
    assert error.startswith('new row for relation "financing_requests" violates check constraint')
    assert "financing_requests_term_months_check" in error
    prod = fetch(source.url, "SELECT count(*) FROM public.financing_requests")[0][0]
    assert fetch(target.url, "SELECT count(*) FROM public.financing_requests")[0][0] == prod - 1 + 12


def test_a_source_connection_lost_mid_table_is_retried(seed_dbs):
    source, target = seed_dbs
    # Slow the target's document inserts so the documents copy spans several seconds of batches.
    execute(
        target.url,
        """
        CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_sleep(0.002); RETURN NEW; END $$;
        CREATE TRIGGER slow BEFORE INSERT ON public.documents FOR EACH ROW EXECUTE FUNCTION slow();
    """,
    )
    killed: list[int] = []

    async def killer() -> None:
        # Kill the source reader (the only one: --jobs 1) once the documents copy has committed a batch
        # but has at least two left, so the reader is certain to be needed again.
        sconn, tconn = await asyncpg.connect(source.admin_url), await asyncpg.connect(target.admin_url)
        try:
            for _ in range(5000):
                midway = (
                    await tconn.fetchval(
                        "SELECT EXISTS (SELECT 1 FROM _sync.checkpoints "
                        "WHERE table_name = 'public.documents' AND rows_done BETWEEN 1 AND 250 AND NOT done)"
                    )
                    if await tconn.fetchval("SELECT to_regclass('_sync.checkpoints') IS NOT NULL")
                    else False
                )
                # The reader copying the documents (the run keeps others idle, for its next steps).
                pids = await sconn.fetch(
                    "SELECT pid FROM pg_stat_activity "
                    "WHERE application_name = 'sync reader' AND datname = $1 AND query LIKE '%documents%'",
                    source.name,
                )
                if midway and pids:
                    await sconn.execute("SELECT pg_terminate_backend($1)", pids[0]["pid"])
                    killed.append(pids[0]["pid"])
                    return
                await asyncio.sleep(0.002)
        finally:
            await sconn.close()
            await tconn.close()

    async def both():
        task = asyncio.create_task(killer())
        report = await run_sync(
            Endpoint.parse(Side.SOURCE, source.url),
            Endpoint.parse(Side.TARGET, target.url),
            load_mapping(SEED_MAPPING),
            RunOptions(since=scenario.COPY_DATE, batch_size=100, jobs=1),
            auth_stage=auth_import(AuthOptions()),
        )
        await task
        return report

    report = asyncio.run(both())
    assert killed, "no source reader was seen mid-table"
    assert report.exit_code == 0
    assert sum(t.retries for t in report.tables) >= 1
    prod = fetch(source.url, "SELECT count(*) FROM public.documents")[0][0]
    assert fetch(target.url, "SELECT count(*) FROM public.documents")[0][0] == prod + 8


@pytest.mark.parametrize("mode", ["direct", "admin-api"])
def test_soft_deleted_production_users_land_with_their_rows_and_verify_equal(
    seed_dbs, seed: scenario.Scenario, mode
):
    source, target = seed_dbs
    deleted = [str(u) for u in seed.soft_deleted]

    async def run() -> tuple[object, int]:
        async with AdminApiServer(target.url) as server:
            extra = ["--auth-mode", "admin-api", "--supabase-url", server.url] if mode == "admin-api" else []
            runner = CliRunner(env={"SUPABASE_SERVICE_ROLE_KEY": server.service_key})
            result = await asyncio.to_thread(
                runner.invoke, main, seed_run_args(source, target, "--json", *extra)
            )
            return result, server.creates

    result, creates = asyncio.run(run())

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["auth"]["quarantined"] == 0 and all(t["quarantined"] == 0 for t in report["tables"])
    if mode == "admin-api":
        assert creates > 2900, "the live users went through the API"
        notes = [n["note"] for n in report["auth"]["notes"] if n["source_id"] in deleted]
        assert len(notes) == len(deleted) and all("soft-deleted by the Auth server" in n for n in notes)
    # As production has them: scrambled contacts, no password, deleted_at; and every row they own.
    query = (
        "SELECT u.id::text, lower(u.email), u.phone, coalesce(u.encrypted_password, ''), u.deleted_at, "
        "(SELECT count(*) FROM public.financing_requests r WHERE r.profile_id = u.id), "
        "(SELECT count(*) FROM public.documents d WHERE d.profile_id = u.id) "
        "FROM auth.users u WHERE u.id = ANY(%s::uuid[]) ORDER BY 1"
    )
    production = fetch(source.url, query, deleted)
    assert len(production) == len(deleted) and all(row[5] > 0 and row[4] for row in production)
    assert fetch(target.url, query, deleted) == production
    code, checked = verify(source, target)
    assert code == 0, problems(checked)
    assert checked["users"]["equal"] == 4082


def test_a_run_that_grew_the_ledger_analyses_it_and_a_small_catch_up_leaves_it(seed_dbs):
    """The first run analyses the ledger it filled (a catch-up's per-key probes are planned by those
    statistics before autovacuum gets to them); a catch-up that adds a few entries leaves them as they are."""
    source, target = seed_dbs
    analysed = (
        "SELECT s.analyze_count, c.reltuples::bigint FROM pg_stat_user_tables AS s "
        "JOIN pg_class AS c ON c.oid = s.relid WHERE s.relid = '_sync.landed'::regclass"
    )
    assert sync_run(source, target).exit_code == 0
    entries = fetch(target.url, "SELECT count(*) FROM _sync.landed")[0][0]
    assert fetch(target.url, analysed) == [(1, entries)]
    execute(
        source.url,
        "UPDATE public.profiles SET updated_at = now() "
        "WHERE id IN (SELECT id FROM public.profiles ORDER BY id LIMIT 3)",
    )
    caught_up = seed_sync(source, target, overlap=timedelta(0))
    assert caught_up.exit_code == 0 and sum(t.written for t in caught_up.tables) >= 3
    assert fetch(target.url, analysed) == [(1, entries)]


def test_a_ledger_analysis_that_cannot_take_its_lock_is_a_warning_and_the_run_succeeds(seed_dbs, caplog):
    """Another session holding the lock an analysis needs (as a manual VACUUM would): the run waits its
    lock timeout, warns, and ends as it would have; its record says it succeeded."""
    source, target = seed_dbs

    async def state() -> None:
        conn = await connect(Endpoint.parse(Side.TARGET, target.url))
        try:
            await ensure_state(conn)
        finally:
            await conn.close()

    asyncio.run(state())
    with psycopg.connect(target.url) as holder:
        holder.execute("LOCK TABLE _sync.landed IN SHARE UPDATE EXCLUSIVE MODE")
        with caplog.at_level(logging.WARNING, logger="sync"):
            report = sync_run(source, target)
        holder.rollback()
    assert report.exit_code == 0
    warned = [r.getMessage() for r in caplog.records if "statistics were not refreshed" in r.getMessage()]
    assert len(warned) == 1 and "lock timeout" in warned[0], warned
    analysed = "SELECT analyze_count FROM pg_stat_user_tables WHERE relid = '_sync.landed'::regclass"
    assert fetch(target.url, analysed) == [(0,)]
    assert fetch(target.url, "SELECT status FROM _sync.runs ORDER BY id DESC LIMIT 1") == [("succeeded",)]
