"""One snapshot and one lock: the users come from the run's instant, and every command that writes
takes the run lock, so two writers never work on one target."""

from __future__ import annotations

import json
import uuid

import psycopg
from click.testing import CliRunner
from queries import SEED_MAPPING, execute, fetch, seed_run_args

from sync.auth import AuthOptions, import_users
from sync.cli import main
from sync.connect import Endpoint, Side
from sync.snapshot import SourceSnapshot
from sync.state import LOCK_KEY


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
