"""Production deletes and the ledger: a row stays itself, and what production deleted leaves only when asked.

Production and the development copy share four people (created before the copy on 2024-11-18), each
with a profile and a request; development added a tester of its own and a note (in a table only
development has) on Carla's profile.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import psycopg
import pytest
from click.testing import CliRunner
from queries import execute, fetch
from unchanged import unchanged

from sync.auth import AuthOptions, AuthReport
from sync.auth.match import deleted_ones
from sync.cli import main
from sync.connect import Endpoint, Side, connect
from sync.deletes import DeletesReport
from sync.errors import first_cause
from sync.mapping import Mapping
from sync.modes import DeleteMode
from sync.run import RunOptions, RunReport, auth_import, run_auth_only, run_sync
from sync.run_deletes import deletes_beside
from sync.state import ensure_state

SINCE = datetime(2024, 11, 18, tzinfo=UTC)
ANA, BETO, CARLA, DIEGO, TESTER, ANA_AGAIN, ELENA = (
    f"00000000-0000-4000-8000-00000000000{n}" for n in range(1, 8)
)

APP = """
CREATE TABLE public.profiles (
    id uuid PRIMARY KEY REFERENCES auth.users ON DELETE CASCADE,
    name text, created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL);
CREATE TABLE public.requests (
    id bigserial PRIMARY KEY, profile_id uuid NOT NULL REFERENCES public.profiles ON DELETE CASCADE,
    amount integer, created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL);
"""
MAPPING = {"tables": {"public.requests": {"key": "remap", "match_on": ["created_at", "profile_id"]}}}


def add_user(url: str, user_id: str, email: str, at: str) -> None:
    """A confirmed e-mail user with its e-mail identity and profile, as the Auth server and app make it."""
    execute(
        url,
        """
        INSERT INTO auth.users (instance_id, id, aud, role, email, encrypted_password, email_confirmed_at,
            confirmation_token, recovery_token, email_change_token_new, email_change,
            email_change_token_current, raw_app_meta_data, raw_user_meta_data, created_at, updated_at)
        VALUES ('00000000-0000-0000-0000-000000000000', %s, 'authenticated', 'authenticated', %s,
            '$2b$04$abcdefghijklmnopqrstuu5tWcKdpCD2eOyDrQwF5vOFqOzjvYVJ6', %s, '', '', '', '', '',
            '{"provider": "email", "providers": ["email"]}', '{}', %s, %s)
        """,
        user_id,
        email,
        at,
        at,
        at,
    )
    execute(
        url,
        "INSERT INTO auth.identities (provider_id, user_id, identity_data, provider, created_at, updated_at) "
        "VALUES (%s, %s, jsonb_build_object('sub', %s::text, 'email', %s::text), 'email', %s, %s)",
        user_id,
        user_id,
        user_id,
        email,
        at,
        at,
    )
    execute(url, "INSERT INTO public.profiles VALUES (%s, %s, %s, %s)", user_id, email.split("@")[0], at, at)


@pytest.fixture
def pair(make_db):
    """(production, development): the people both know, and development's own tester and note."""
    source, target = make_db(), make_db()
    for db in (source, target):
        execute(db.url, APP)
        for n, (user, name) in enumerate(((ANA, "ana"), (BETO, "beto"), (CARLA, "carla"), (DIEGO, "diego"))):
            add_user(db.url, user, f"{name}@ultima.mx", "2024-10-01")
            execute(
                db.url,
                "INSERT INTO public.requests (id, profile_id, amount, created_at, updated_at) "
                "VALUES (%s, %s, 100, '2024-10-02', '2024-10-02')",
                n + 1,
                user,
            )
        execute(db.url, "SELECT setval('public.requests_id_seq', 4)")
    add_user(target.url, TESTER, "tester@ultima.mx", "2024-11-25")
    execute(
        target.url,
        f"""
        CREATE TABLE public.notes (id serial PRIMARY KEY, profile_id uuid REFERENCES public.profiles
            ON DELETE CASCADE, body text);
        INSERT INTO public.notes (profile_id, body) VALUES ('{CARLA}', 'development''s note');
        """,
    )
    return source, target


def run(source, target, deletes: DeleteMode = DeleteMode.REPORT, **options) -> RunReport:
    return asyncio.run(
        run_sync(
            Endpoint.parse(Side.SOURCE, source.url),
            Endpoint.parse(Side.TARGET, target.url),
            Mapping.model_validate(MAPPING),
            RunOptions(deletes=deletes, **options),
            auth_stage=auth_import(AuthOptions()),
        )
    )


def found(report: RunReport) -> dict[str, tuple[int, list[str]]]:
    assert report.deletes is not None
    rows = [report.deletes.users, *report.deletes.tables]
    return {d.table: (d.found, d.keys) for d in rows if d is not None and d.found}


def production_deletes_ana_carla_and_betos_request(source) -> None:
    execute(
        source.url,
        f"DELETE FROM auth.users WHERE id IN ('{ANA}', '{CARLA}'); DELETE FROM public.requests WHERE id = 2;",
    )


def users(url: str) -> list[str]:
    return [r[0] for r in fetch(url, "SELECT id::text FROM auth.users ORDER BY id")]


def test_production_deletes_are_reported_and_nothing_changes(pair):
    source, target = pair
    production_deletes_ana_carla_and_betos_request(source)
    before = users(target.url), fetch(target.url, "SELECT count(*) FROM public.requests")
    report = run(source, target, since=SINCE)
    assert found(report) == {
        "auth.users": (2, [ANA, CARLA]),
        "public.profiles": (2, [ANA, CARLA]),
        "public.requests": (3, ["1", "2", "3"]),
    }
    assert (users(target.url), fetch(target.url, "SELECT count(*) FROM public.requests")) == before
    assert report.exit_code == 0


def test_reported_deletes_are_searched_beside_the_import_in_the_target_as_it_was(pair):
    """Only reported, the search goes on while the users are imported (the import waits for the deleted
    users, which it knows first), and it reads the target as it was before the run wrote: the same
    answer as searched alone."""
    source, target = pair
    production_deletes_ana_carla_and_betos_request(source)
    seen: dict[str, object] = {}
    with psycopg.connect(target.url) as holder:
        release = threading.Timer(30, holder.commit)  # never held for good, even when searched first

        async def lock_requests() -> None:
            # Once the plan is read: the search of public.requests waits for this lock, the users' not.
            holder.execute("LOCK TABLE public.requests IN ACCESS EXCLUSIVE MODE")
            release.start()

        stage = auth_import(AuthOptions())
        waits = "SELECT wait_event_type FROM pg_stat_activity WHERE application_name = 'sync deletes'"

        async def import_while_searching(ctx) -> AuthReport:
            seen["deleted users"] = sorted(str(u) for u in await deleted_ones(ctx.deleted_accounts))
            for _ in range(200):  # until the search reaches the locked table (or is seen not to)
                seen["searching"] = await asyncio.to_thread(fetch, target.url, waits)
                if seen["searching"] != [("Client",)]:
                    break
                await asyncio.sleep(0.05)
            holder.commit()  # the lock goes, and the search goes on beside the import
            return await stage(ctx)

        report = asyncio.run(
            run_sync(
                Endpoint.parse(Side.SOURCE, source.url),
                Endpoint.parse(Side.TARGET, target.url),
                Mapping.model_validate(MAPPING),
                RunOptions(since=SINCE),
                auth_stage=import_while_searching,
                checks=[lock_requests],
            )
        )
        release.cancel()
    assert seen == {"deleted users": [ANA, CARLA], "searching": [("Lock",)]}
    assert found(report) == {
        "auth.users": (2, [ANA, CARLA]),
        "public.profiles": (2, [ANA, CARLA]),
        "public.requests": (3, ["1", "2", "3"]),
    }
    assert report.exit_code == 0


@pytest.mark.parametrize("applied", [False, True], ids=["reported", "applied"])
def test_the_import_is_given_the_deleted_users_when_reported_at_once_when_applied_once_committed(applied):
    """Reported, the deleted users go to the import as soon as the search knows them; applied, only when
    the search has ended (its deletes committed), so the import never reads a target about to lose them."""

    async def scenario() -> tuple[bool, frozenset[uuid.UUID]]:
        committed = asyncio.Event()

        async def search(known: Callable[[set[str]], None]) -> tuple[DeletesReport, set[str]]:
            known({ANA})
            await committed.wait()  # the tables searched after the users, then the commit
            return DeletesReport(), {ANA}

        finding, users = deletes_beside(search, applied=applied)
        await asyncio.sleep(0.05)
        given_early = users.done()
        committed.set()
        await finding
        return given_early, await users

    given_early, deleted = asyncio.run(scenario())
    assert given_early is not applied and deleted == {uuid.UUID(ANA)}


def test_the_import_meets_the_search_s_failure_when_it_fails_before_giving_the_users():
    async def scenario() -> BaseException | None:
        async def search(known: Callable[[set[str]], None]) -> tuple[DeletesReport, set[str]]:
            raise RuntimeError("the search broke")

        finding, users = deletes_beside(search)
        await asyncio.gather(finding, return_exceptions=True)
        return users.exception()

    assert str(asyncio.run(scenario())) == "the search broke"


def run_with_users_locked(source, target, until: Callable[[], bool]) -> RunReport:
    """A first run with the target's users locked once the plan is read (the users' search waits on the
    lock), until ``until`` says so (asked every 50 ms, for 30 s at most) or the run ends."""
    with psycopg.connect(target.url) as holder:
        release = threading.Timer(30, holder.commit)  # never held for good

        def watch() -> None:
            for _ in range(600):
                if until():
                    break
                threading.Event().wait(0.05)
            holder.commit()

        watcher = threading.Thread(target=watch)

        async def lock_users() -> None:
            holder.execute("LOCK TABLE auth.users IN ACCESS EXCLUSIVE MODE")
            release.start()
            watcher.start()

        try:
            return asyncio.run(
                run_sync(
                    Endpoint.parse(Side.SOURCE, source.url),
                    Endpoint.parse(Side.TARGET, target.url),
                    Mapping.model_validate(MAPPING),
                    RunOptions(since=SINCE),
                    auth_stage=auth_import(AuthOptions()),
                    checks=[lock_users],
                )
            )
        finally:
            watcher.join()
            release.cancel()


def test_the_import_stages_production_users_while_the_search_waits_and_matches_once_it_knows(pair):
    """The users' search held up (a lock on the target's users): the import stages production's users
    meanwhile, then waits for the deleted ones before it reads the target's; Ana, deleted and signed up
    again under a new id, is held back rather than matched to her old account by e-mail."""
    source, target = pair
    production_deletes_ana_carla_and_betos_request(source)
    add_user(source.url, ANA_AGAIN, "ana@ultima.mx", "2025-01-10")
    activity = (
        "SELECT application_name, state, wait_event_type, query FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    seen: list[tuple] = []

    # The import's connection idle after its COPY of production's user keys, or their ANALYZE (a stage
    # this small has its statistics taken), while the search waits on the lock.
    staging = ('COPY "_sync_user_keys"', "ANALYZE _sync_user_keys")

    def staged_while_the_search_waits() -> bool:
        now = fetch(target.url, activity)
        staged = [r for r in now if r[1] == "idle" and r[3].startswith(staging)]
        if staged and any(r[0] == "sync deletes" and r[2] == "Lock" for r in now):
            seen.extend(staged)
        return bool(seen)

    report = run_with_users_locked(source, target, staged_while_the_search_waits)
    assert len(seen) == 1
    assert report.auth is not None
    (why,) = [q.error for q in report.auth.quarantine if str(q.source_id) == ANA_AGAIN]
    assert "deleted" in why and ANA in why
    assert found(report)["auth.users"] == (2, [ANA, CARLA])


def test_a_search_that_fails_before_it_knows_the_users_fails_the_run_before_any_user_is_written(pair):
    """The users' search ended while it waits (its backend terminated): the import, which staged
    production's users meanwhile, writes none, no table row is copied, and the run fails."""
    source, target = pair
    production_deletes_ana_carla_and_betos_request(source)
    add_user(source.url, ELENA, "elena@ultima.mx", "2025-01-10")
    before = (users(target.url), fetch(target.url, "SELECT count(*) FROM public.requests"))
    searching = (
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = 'sync deletes' AND wait_event_type = 'Lock'"
    )
    ended: list[int] = []

    def search_ended() -> bool:
        if waiting := fetch(target.url, searching):
            ended.append(waiting[0][0])
            execute(target.admin_url, "SELECT pg_terminate_backend(%s)", waiting[0][0])
        return bool(ended)

    with pytest.raises(Exception) as failure:
        run_with_users_locked(source, target, search_ended)
    assert ended, "the search never waited on the lock"
    # The failure itself, not a secondary one from rolling back on the connection it lost.
    assert "terminating connection due to administrator command" in str(first_cause(failure.value))
    assert (users(target.url), fetch(target.url, "SELECT count(*) FROM public.requests")) == before


def test_applied_deletes_remove_what_production_deleted_but_never_a_development_row(pair):
    source, target = pair
    production_deletes_ana_carla_and_betos_request(source)
    report = run(source, target, DeleteMode.APPLY, since=SINCE)
    assert report.deletes is not None and report.deletes.users is not None
    # Carla's profile holds development's note: it stays, and so does Carla's account.
    assert (report.deletes.users.deleted, report.deletes.users.held) == (1, 1)
    profiles = next(d for d in report.deletes.tables if d.table == "public.profiles")
    assert (profiles.deleted, profiles.held, profiles.held_keys) == (1, 1, [CARLA])
    assert users(target.url) == [BETO, CARLA, DIEGO, TESTER]
    assert fetch(target.url, "SELECT count(*) FROM auth.identities WHERE user_id = %s", ANA) == [(0,)]
    assert fetch(target.url, "SELECT id FROM public.requests ORDER BY id") == [(4,)]
    assert fetch(target.url, "SELECT body FROM public.notes") == [("development's note",)]
    again = run(source, target, DeleteMode.APPLY)
    assert found(again) == {"auth.users": (1, [CARLA]), "public.profiles": (1, [CARLA])}


def test_soft_deleted_users_are_banned_and_obfuscated_as_the_auth_server_does(pair):
    source, target = pair
    execute(source.url, f"DELETE FROM auth.users WHERE id = '{ANA}'")
    report = run(source, target, DeleteMode.SOFT, since=SINCE)
    assert report.deletes is not None and report.deletes.users is not None
    assert report.deletes.users.deleted == 1
    ((email, deleted, banned, password, subject),) = fetch(
        target.url,
        "SELECT u.email, u.deleted_at IS NOT NULL, u.banned_until > now() + interval '50 years', "
        "u.encrypted_password, i.provider_id FROM auth.users u JOIN auth.identities i ON i.user_id = u.id "
        "WHERE u.id = %s",
        ANA,
    )
    assert (deleted, banned, password) == (True, True, "")
    assert "@" not in email and len(email) == 43
    assert subject != ANA and len(subject) == 43
    assert fetch(target.url, "SELECT count(*) FROM public.profiles WHERE id = %s", ANA) == [(0,)]


def test_a_person_who_deleted_the_account_and_signed_up_again_is_a_new_user(pair):
    source, target = pair
    assert run(source, target, since=SINCE).exit_code == 0
    execute(source.url, f"DELETE FROM auth.users WHERE id = '{ANA}'")
    add_user(source.url, ANA_AGAIN, "ana@ultima.mx", "2025-01-10")
    execute(
        source.url,
        "INSERT INTO public.requests (profile_id, amount, created_at, updated_at) "
        "VALUES (%s, 7, '2025-01-11', '2025-01-11')",
        ANA_AGAIN,
    )
    held = run(source, target)
    assert held.auth is not None
    (why,) = [q.error for q in held.auth.quarantine if str(q.source_id) == ANA_AGAIN]
    assert "deleted" in why and ANA in why
    assert fetch(target.url, "SELECT count(*) FROM public.requests WHERE profile_id = %s", ANA) == [(1,)]
    assert fetch(target.url, "SELECT count(*) FROM public.requests WHERE amount = 7") == [(0,)]

    applied = run(source, target, DeleteMode.APPLY)
    assert applied.exit_code == 0
    assert ANA not in users(target.url) and ANA_AGAIN in users(target.url)
    new_request = fetch(target.url, "SELECT profile_id::text FROM public.requests WHERE amount = 7")
    assert new_request == [(ANA_AGAIN,)]
    assert fetch(target.url, "SELECT count(*) FROM public.requests WHERE profile_id = %s", ANA) == [(0,)]


def test_a_request_moved_to_another_person_after_landing_is_updated_not_duplicated(pair):
    source, target = pair
    execute(
        source.url,
        f"INSERT INTO public.requests (id, profile_id, amount, created_at, updated_at) "
        f"VALUES (5, '{BETO}', 500, '2024-12-01', '2024-12-01')",
    )
    assert run(source, target, since=SINCE).exit_code == 0
    assert fetch(target.url, "SELECT profile_id::text FROM public.requests WHERE amount = 500") == [(BETO,)]
    execute(source.url, f"UPDATE public.requests SET profile_id = '{DIEGO}', updated_at = now() WHERE id = 5")
    report = run(source, target)
    assert sum(t.remapped for t in report.tables) == 0
    assert fetch(target.url, "SELECT id, profile_id::text FROM public.requests WHERE amount = 500") == [
        (5, DIEGO)
    ]
    ledger = "SELECT target_key FROM _sync.landed WHERE table_name = 'public.requests' AND source_key = '5'"
    assert fetch(target.url, ledger) == [("5",)]


async def _state_as_version_5(url: str) -> None:
    """The tool's state as version 5 left it: an index of every entry's target key in the ledger."""
    conn = await connect(Endpoint.parse(Side.TARGET, url))
    try:
        await ensure_state(conn)
        await conn.execute(
            "DROP INDEX _sync.landed_moved_idx; "
            "CREATE INDEX landed_target_idx ON _sync.landed (table_name, target_key); "
            "DELETE FROM _sync.schema_version WHERE version > 5"
        )
    finally:
        await conn.close()


def test_a_row_the_ledger_alone_names_as_another_one_s_landing_is_not_a_delete_after_an_upgrade(pair):
    """A target row dated before the copy that the ledger (with no id-map entry) says production's request
    1 landed as is that request's, not a row of its own production deleted. The ledger holds such a moved
    entry in an index of its own; a state from before that index is upgraded by the run."""
    source, target = pair
    asyncio.run(_state_as_version_5(target.url))
    execute(
        target.url,
        f"INSERT INTO public.requests (id, profile_id, amount, created_at, updated_at) "
        f"VALUES (7, '{BETO}', 100, '2024-10-02', '2024-10-02'); "
        "INSERT INTO _sync.landed (table_name, source_key, target_key) VALUES ('public.requests', '1', '7')",
    )

    assert found(run(source, target, since=SINCE)) == {}

    indexes = (
        "SELECT indexname FROM pg_indexes WHERE schemaname = '_sync' AND tablename = 'landed' ORDER BY 1"
    )
    assert fetch(target.url, indexes) == [("landed_moved_idx",), ("landed_pkey",)]
    moved = "SELECT indexdef FROM pg_indexes WHERE indexname = 'landed_moved_idx'"
    assert "WHERE (target_key <> source_key)" in fetch(target.url, moved)[0][0]
    execute(source.url, "DELETE FROM public.requests WHERE id = 1")
    assert found(run(source, target)) == {"public.requests": (2, ["1", "7"])}


def test_sync_plan_reports_production_deletes_per_table_and_writes_nothing(pair, tmp_path):
    source, target = pair
    production_deletes_ana_carla_and_betos_request(source)
    mapping = tmp_path / "sync.toml"
    mapping.write_text('[tables."public.requests"]\nkey = "remap"\nmatch_on = ["created_at", "profile_id"]\n')
    args = ["--source", source.url, "--target", target.url, "--mapping", str(mapping)]

    with unchanged(source, target):
        shown = CliRunner().invoke(main, ["plan", "--since", "2024-11-18", *args])

    assert shown.exit_code == 0, shown.output
    assert f"  - auth.users: 2 deleted in production (first: {ANA}, {CARLA})" in shown.stdout
    assert f"  - public.profiles: 2 deleted in production (first: {ANA}, {CARLA})" in shown.stdout
    assert "  - public.requests: 3 deleted in production (first: 1, 2, 3)" in shown.stdout
    # The run finds the same ones (and, under --deletes report, changes nothing either).
    assert found(run(source, target, since=SINCE)) == {
        "auth.users": (2, [ANA, CARLA]),
        "public.profiles": (2, [ANA, CARLA]),
        "public.requests": (3, ["1", "2", "3"]),
    }
    with unchanged(source, target):
        again = CliRunner().invoke(main, ["plan", *args])
    assert "  - public.requests: 3 deleted in production (first: 1, 2, 3)" in again.stdout


def counted(report: RunReport) -> set[str]:
    """The tables whose production deletes the run settled by counting, comparing no key."""
    assert report.deletes is not None
    rows = [report.deletes.users, *report.deletes.tables]
    return {d.table for d in rows if d is not None and d.counted}


EVERY = {"auth.users", "public.profiles", "public.requests"}


def after(source, target, change: str, deletes: DeleteMode = DeleteMode.REPORT) -> RunReport:
    """The catch-up after ``change`` in production."""
    execute(source.url, change)
    return run(source, target, deletes)


def test_a_catch_up_settles_deletes_by_counting_and_compares_keys_when_the_count_cannot(pair):
    source, target = pair
    assert counted(run(source, target, since=SINCE)) == set(), "a first run has nothing to count against"
    new_request = (
        "INSERT INTO public.requests (id, profile_id, amount, created_at, updated_at) "
        f"VALUES (50, '{DIEGO}', 50, now(), now())"
    )
    quiet = after(source, target, new_request)
    assert (counted(quiet), found(quiet)) == (EVERY, {})
    # Edits of rows the target holds from production (brought by the copy, and the request landed by the
    # last run as 50): those rows were there before, so nothing is missing.
    edited = after(
        source,
        target,
        f"UPDATE public.requests SET amount = 7 WHERE id IN (1, 50); "
        f"UPDATE public.profiles SET name = 'ana maría', updated_at = now() WHERE id = '{ANA}'; "
        f"UPDATE auth.users SET raw_user_meta_data = '{{\"a\": 1}}' WHERE id = '{BETO}'",
    )
    assert (counted(edited), found(edited)) == (EVERY, {})
    # One request deleted and one edited: the edit does not hide the delete.
    report = after(
        source,
        target,
        "DELETE FROM public.requests WHERE id = 3; UPDATE public.requests SET amount = 8 WHERE id = 4",
    )
    assert (counted(report), found(report)) == (EVERY - {"public.requests"}, {"public.requests": (1, ["3"])})
    execute(target.url, "DELETE FROM public.requests WHERE id = 3")  # development's own delete
    # One request deleted and one added: as many rows as before, and the delete is still found.
    report = after(
        source,
        target,
        "DELETE FROM public.requests WHERE id = 2; INSERT INTO public.requests "
        f"(profile_id, amount, created_at, updated_at) VALUES ('{ANA}', 5, now(), now())",
    )
    assert (counted(report), found(report)) == (EVERY - {"public.requests"}, {"public.requests": (1, ["2"])})
    # Reported, not applied: it is still on the target, so the next run compares that table again.
    again = run(source, target)
    assert (counted(again), found(again)) == (EVERY - {"public.requests"}, {"public.requests": (1, ["2"])})
    applied = run(source, target, DeleteMode.APPLY)
    assert found(applied) == {"public.requests": (1, ["2"])} and applied.deletes.deleted == 1
    assert counted(run(source, target)) == EVERY


def test_a_user_an_auth_only_import_landed_and_production_deleted_is_found(pair):
    """``--auth-only`` lands users from a snapshot of its own and leaves no run record: the next run
    cannot count against the last run's and compares the users' keys."""
    source, target = pair
    run(source, target, since=SINCE)
    add_user(source.url, ELENA, "elena@ultima.mx", "2024-12-01")
    ends = Endpoint.parse(Side.SOURCE, source.url), Endpoint.parse(Side.TARGET, target.url)
    asyncio.run(run_auth_only(*ends, AuthOptions()))
    assert ELENA in users(target.url)
    execute(source.url, f"DELETE FROM auth.users WHERE id = '{ELENA}'")
    report = run(source, target)
    assert "auth.users" not in counted(report)
    assert found(report) == {"auth.users": (1, [ELENA])}
