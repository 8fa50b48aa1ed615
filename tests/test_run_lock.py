"""One snapshot and one lock: the users come from the run's instant, and every command that writes
takes the run lock, so two writers never work on one target."""

from __future__ import annotations

import json
import time
import uuid

import psycopg
from click.testing import CliRunner
from queries import SEED_MAPPING, execute, fetch, seed_run_args
from test_resume import content, finish, start, wait_until

from sync.auth import AuthOptions, import_users
from sync.cli import main
from sync.connect import Endpoint, Side
from sync.snapshot import SourceSnapshot
from sync.state import FENCE_KEY, LOCK_KEY


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def sign_up(url: str, email: str) -> uuid.UUID:
    """A production sign-up, as the Auth server writes the user row."""
    user_id = uuid.uuid4()
    execute(
        url,
        "INSERT INTO auth.users (id, instance_id, aud, role, email, encrypted_password, created_at, "
        "updated_at) VALUES (%s, '00000000-0000-0000-0000-000000000000', 'authenticated', "
        "'authenticated', %s, '$2a$10$abcdefghijklmnopqrstuuSGLHGbc0Y3n3u6bAUhVFNvBgwY1G4u6', now(), now())",
        user_id,
        email,
    )
    return user_id


def hold_run_lock(url: str) -> psycopg.Connection:
    """A session holding the run lock, as a run in progress does."""
    conn = psycopg.connect(url, autocommit=True)
    conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
    return conn


async def test_the_auth_import_reads_the_users_of_the_runs_snapshot(seed_dbs):
    source, target = seed_dbs
    endpoints = Endpoint.parse(Side.SOURCE, source.url), Endpoint.parse(Side.TARGET, target.url)
    snapshot = await SourceSnapshot(endpoints[0]).open()
    try:
        # A person signs up while the run is under way: after the run's instant.
        late = sign_up(source.admin_url, "late.signup@example.mx")
        report = await import_users(*endpoints, AuthOptions(), snapshot=snapshot)
    finally:
        await snapshot.close()
    source_users = fetch(source.url, "SELECT count(*) FROM auth.users")[0][0]
    assert report.source_users == source_users - 1, "the import saw exactly the run's instant"
    assert fetch(target.url, "SELECT count(*) FROM auth.users WHERE id = %s", late) == [(0,)]
    # The next run's instant includes the sign-up.
    again = await import_users(*endpoints, AuthOptions())
    assert again.source_users == source_users and again.created == 1


def test_auth_only_is_refused_while_another_run_holds_the_lock(seed_dbs):
    source, target = seed_dbs
    before = fetch(target.url, "SELECT count(*) FROM auth.users")
    holder = hold_run_lock(target.url)
    try:
        refused = cli("run", "--auth-only", "--source", source.url, "--target", target.url)
    finally:
        holder.close()
    assert refused.exit_code == 1
    assert "Another sync is running on this target" in refused.output
    assert fetch(target.url, "SELECT count(*) FROM auth.users") == before, "nothing was written"
    landed = cli("run", "--auth-only", "--source", source.url, "--target", target.url, "--quiet")
    assert landed.exit_code == 0, landed.output
    assert fetch(target.url, "SELECT count(*) FROM auth.users") > before


def test_quarantine_retry_takes_the_lock_and_reimports_only_the_quarantined_users(seed_dbs):
    source, target = seed_dbs
    refused = fetch(
        source.url,
        "SELECT email FROM auth.users WHERE created_at > '2024-12-01' AND email LIKE '%%@%%' LIMIT 1",
    )[0][0]
    execute(
        target.admin_url,
        f"""
        CREATE FUNCTION public.refuse_one() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF new.email = '{refused}' THEN RAISE EXCEPTION 'signups from % are closed', new.email; END IF;
            RETURN new;
        END $$;
        CREATE TRIGGER refuse_one AFTER INSERT ON auth.users
            FOR EACH ROW EXECUTE FUNCTION public.refuse_one();
        """,
    )
    first = cli(*seed_run_args(source, target, "--quiet"))
    assert first.exit_code == 3, first.output
    assert fetch(target.url, "SELECT count(*) FROM auth.users WHERE email = %s", refused) == [(0,)]
    retry = ["quarantine", "retry", "--source", source.url, "--target", target.url]
    retry += ["--mapping", str(SEED_MAPPING), "--json"]

    holder = hold_run_lock(target.url)
    try:
        locked = cli(*retry)
    finally:
        holder.close()
    assert locked.exit_code == 1 and "Another sync is running on this target" in locked.output

    execute(target.admin_url, "DROP TRIGGER refuse_one ON auth.users")
    retried = cli(*retry)
    assert retried.exit_code == 0, retried.output
    report = json.loads(retried.stdout)
    assert report["auth"]["source_users"] == 1 and report["auth"]["created"] == 1
    assert fetch(target.url, "SELECT count(*) FROM auth.users WHERE email = %s", refused) == [(1,)]
    assert fetch(target.url, "SELECT count(*) FROM _sync.quarantine WHERE resolved_at IS NULL") == [(0,)]

    # Nothing left in quarantine: a retry reads no user at all.
    idle = json.loads(cli(*retry).stdout)
    assert idle["auth"] is None and idle["exit_code"] == 0


# ----------------------------------------------------------------------------- a lock that is lost

MID_TABLE = "SELECT EXISTS (SELECT 1 FROM _sync.checkpoints WHERE rows_done > 0 AND NOT done)"
LOCK_BACKEND = (
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
    "WHERE application_name = 'sync lock' AND datname = current_database()"
)
RUN = ("--since", "2024-11-18", "--batch-size", "20", "--jobs", "1")


def reference_content(source, make_db, seed_templates) -> dict[str, str]:
    """What the target holds after one uninterrupted run."""
    reference = make_db(seed_templates[1])
    code, _, err = finish(start(source, reference, "--since", "2024-11-18", "--quiet"))
    assert code == 0, err
    return content(reference.url)


def test_a_run_whose_lock_connection_dies_takes_it_again_and_a_second_run_never_works_beside_it(
    seed_dbs, make_db, seed_templates
):
    source, target = seed_dbs
    expected = reference_content(source, make_db, seed_templates)
    first = start(source, target, *RUN)
    assert wait_until(target.url, MID_TABLE, first)
    assert fetch(target.admin_url, LOCK_BACKEND) == [(True,)]
    second_code, _, second_err = finish(start(source, target, "--since", "2024-11-18", "--quiet"))
    code, _, err = finish(first)

    assert code == 0, err
    assert "the run lock's connection was lost; taking the lock again" in err
    assert "the run lock is held again" in err
    assert second_code == 1 and "Another sync is running on this target" in second_err
    assert content(target.url) == expected


def test_when_another_run_took_the_lost_lock_the_first_stops_at_once_and_writes_nothing_more(
    seed_dbs, make_db, seed_templates
):
    source, target = seed_dbs
    expected = reference_content(source, make_db, seed_templates)
    first = start(source, target, *RUN)
    assert wait_until(target.url, MID_TABLE, first)
    with psycopg.connect(target.admin_url, autocommit=True) as other:
        # Another run takes the lock the moment the first one's connection ends, as `sync run` does:
        # it bumps the epoch and waits for the first run's batch in flight.
        other.execute(LOCK_BACKEND)
        other.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        other.execute("UPDATE _sync.lock_epoch SET epoch = epoch + 1")
        other.execute("SELECT pg_advisory_lock(%s), pg_advisory_unlock(%s)", (FENCE_KEY, FENCE_KEY))
        landed = content(target.url), fetch(target.url, "SELECT sum(rows_done) FROM _sync.checkpoints")
        code, _, err = finish(first)
        assert code == 1
        assert "The run lock was lost" in err and "Traceback" not in err
        after = content(target.url), fetch(target.url, "SELECT sum(rows_done) FROM _sync.checkpoints")
        assert after == landed, "the first run wrote nothing once the other held the lock"
    code, _, err = finish(start(source, target, "--since", "2024-11-18", "--quiet"))
    assert code == 0, err
    assert content(target.url) == expected


# ------------------------------------------------------------------- another session's table lock


def test_a_table_locked_by_another_session_is_waited_for_with_a_report_and_then_copied(
    seed_dbs, make_db, seed_templates
):
    source, target = seed_dbs
    expected = reference_content(source, make_db, seed_templates)
    run = start(source, target, "--since", "2024-11-18", "--batch-size", "200", "--quiet")
    assert wait_until(target.url, "SELECT EXISTS (SELECT 1 FROM _sync.checkpoints)", run)
    with psycopg.connect(target.admin_url) as locker:
        # A migration holds public.documents; the run gets there while it does.
        locker.execute("LOCK TABLE public.documents IN ACCESS EXCLUSIVE MODE")
        waiting = (
            "SELECT EXISTS (SELECT 1 FROM pg_locks AS l JOIN pg_stat_activity AS a USING (pid) "
            "WHERE NOT l.granted AND l.relation = 'public.documents'::regclass "
            "AND a.application_name LIKE 'sync %')"
        )
        assert wait_until(target.admin_url, waiting, run, timeout=120)
        time.sleep(10)
        locker.rollback()
        holder = locker.info.backend_pid
    code, _, err = finish(run)
    assert code == 0, err
    assert f"waiting for a lock on public.documents held by pid {holder} (3 s)" in err
    assert f"waiting for a lock on public.documents held by pid {holder} (6 s)" in err
    assert content(target.url) == expected
