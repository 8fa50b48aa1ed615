"""A live production: the first run and catch-ups run while people sign up, write, edit and delete.

A load generator writes into production for a bounded time (sign-ups with identities and profiles, new
requests for new and old users, edits that bump ``updated_at`` and edits that do not, a transaction
that stamps ``updated_at`` in the past and commits seconds later, deletes of users and requests, a
person who deletes the account and signs up again). Meanwhile the first run and catch-ups run. After
the load stops, a last catch-up applies the production deletes, and the two databases are compared
row by row in SQL: every production row and user on the target exactly once with equal columns, every
production delete found and applied, development's own rows untouched.
"""

from __future__ import annotations

import asyncio
import io
import random
import threading
import time
import uuid
from dataclasses import dataclass, field

import psycopg
import pytest
from queries import execute, fetch
from test_deletes import ANA, APP, CARLA, MAPPING, SINCE, TESTER, add_user

from sync.auth import AuthOptions
from sync.connect import Endpoint, Side
from sync.mapping import Mapping
from sync.modes import DeleteMode
from sync.run import RunOptions, RunReport, auth_import, run_sync

LOAD_SECONDS = 15.0
OLD_USERS = 40
DEV_REQUESTS = (41, 42, 43)  # development's test requests, on keys production's sequence will issue too
HELD = (
    38,
    39,
    40,
)  # old requests a long transaction edits; the rest of the load leaves them (and their users) be


@dataclass
class Load:
    """What the generator did to production."""

    stop: threading.Event = field(default_factory=threading.Event)
    writes: int = 0
    signups: int = 0
    deleted_users: int = 0
    deleted_requests: int = 0
    error: BaseException | None = None


def user_sql(conn: psycopg.Connection, user_id: str, email: str) -> None:
    """A sign-up as the Auth server and the app's trigger make it: user, identity and profile, at once."""
    conn.execute(
        """
        INSERT INTO auth.users (instance_id, id, aud, role, email, encrypted_password, email_confirmed_at,
            confirmation_token, recovery_token, email_change_token_new, email_change,
            email_change_token_current, raw_app_meta_data, raw_user_meta_data, created_at, updated_at)
        VALUES ('00000000-0000-0000-0000-000000000000', %s, 'authenticated', 'authenticated', %s,
            '$2b$04$abcdefghijklmnopqrstuu5tWcKdpCD2eOyDrQwF5vOFqOzjvYVJ6', now(), '', '', '', '', '',
            '{"provider": "email", "providers": ["email"]}', '{}', now(), now())
        """,
        (user_id, email),
    )
    conn.execute(
        "INSERT INTO auth.identities (provider_id, user_id, identity_data, provider, created_at, updated_at) "
        "VALUES (%s, %s, jsonb_build_object('sub', %s::text, 'email', %s::text), 'email', now(), now())",
        (user_id, user_id, user_id, email),
    )
    conn.execute("INSERT INTO public.profiles VALUES (%s, %s, now(), now())", (user_id, email.split("@")[0]))


def generate(url: str, load: Load, seed: int = 7) -> None:
    """Write into production until told to stop (or LOAD_SECONDS pass)."""
    rng = random.Random(seed)
    held = psycopg.connect(url)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            deadline = time.monotonic() + LOAD_SECONDS
            resigned = opened = False
            while time.monotonic() < deadline and not load.stop.is_set():
                users = [r[0] for r in conn.execute("SELECT id::text FROM public.profiles").fetchall()]
                requests = [
                    r[0]
                    for r in conn.execute("SELECT id FROM public.requests WHERE id <> ALL(%s)", (list(HELD),))
                ]
                keep = {
                    r[0]
                    for r in conn.execute(
                        "SELECT profile_id::text FROM public.requests WHERE id = ANY(%s)", (list(HELD),)
                    )
                }
                spare = [u for u in users if u not in (CARLA, ANA) and u not in keep]
                action = rng.random()
                with conn.transaction():
                    if action < 0.25:
                        user_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
                        user_sql(conn, user_id, f"new-{user_id[:8]}@ultima.mx")
                        load.signups += 1
                    elif action < 0.5:
                        conn.execute(
                            "INSERT INTO public.requests (profile_id, amount, created_at, updated_at) "
                            "VALUES (%s, %s, now(), now())",
                            (rng.choice(users), rng.randint(1, 999)),
                        )
                    elif action < 0.65:
                        conn.execute(
                            "UPDATE public.requests SET amount = amount + 1, updated_at = now() "
                            "WHERE id = %s",
                            (rng.choice(requests),),
                        )
                    elif action < 0.8:  # an edit by a script that leaves updated_at alone
                        conn.execute(
                            "UPDATE public.requests SET amount = amount + 1000 WHERE id = %s",
                            (rng.choice(requests),),
                        )
                    elif action < 0.88 and len(spare) > 10:
                        conn.execute("DELETE FROM auth.users WHERE id = %s", (rng.choice(spare),))
                        load.deleted_users += 1
                    elif action < 0.95:
                        conn.execute("DELETE FROM public.requests WHERE id = %s", (rng.choice(requests),))
                        load.deleted_requests += 1
                    else:
                        conn.execute(
                            "UPDATE public.profiles SET name = name || '!' WHERE id = %s",
                            (rng.choice(users),),
                        )
                load.writes += 1
                if not opened and time.monotonic() > deadline - LOAD_SECONDS * 0.6:
                    # Stamped far in the past, committed a few seconds later: after a catch-up's snapshot.
                    held.execute(
                        "UPDATE public.requests SET amount = amount + 5, updated_at = '2024-12-24' "
                        "WHERE id = ANY(%s)",
                        (list(HELD),),
                    )
                    opened, opened_at = True, time.monotonic()
                idle = held.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
                if opened and not idle and time.monotonic() - opened_at > 4:
                    held.commit()
                    load.writes += 1
                if not resigned and time.monotonic() > deadline - LOAD_SECONDS / 2:
                    # Ana deletes her account and signs up again with the same e-mail.
                    with conn.transaction():
                        conn.execute("DELETE FROM auth.users WHERE id = %s", (ANA,))
                        user_sql(conn, str(uuid.UUID(int=rng.getrandbits(128), version=4)), "ana@ultima.mx")
                    resigned = True
                    load.writes += 1
                time.sleep(0.02)
        held.commit()
    except BaseException as exc:  # the test fails with it
        load.error = exc
    finally:
        held.close()


def sync(source, target, deletes: DeleteMode = DeleteMode.REPORT, **options) -> RunReport:
    return asyncio.run(
        run_sync(
            Endpoint.parse(Side.SOURCE, source.url),
            Endpoint.parse(Side.TARGET, target.url),
            Mapping.model_validate(MAPPING),
            RunOptions(deletes=deletes, **options),
            auth_stage=auth_import(AuthOptions()),
        )
    )


def copy_into_target(source, target: psycopg.Connection, name: str, query: str, columns: str) -> int:
    """Production's rows of ``query`` into a temporary table ``name`` on the target; returns the count."""
    buffer = io.BytesIO()
    with psycopg.connect(source.url) as conn, conn.cursor().copy(f"COPY ({query}) TO STDOUT") as out:
        for chunk in out:
            buffer.write(chunk)
    target.execute(f"CREATE TEMP TABLE {name} ({columns})")
    with target.cursor().copy(f"COPY {name} FROM STDIN") as into:
        into.write(buffer.getvalue())
    return target.execute(f"SELECT count(*) FROM {name}").fetchone()[0]  # type: ignore[index]


@pytest.fixture
def live(make_db):
    source, target = make_db(), make_db()
    for db in (source, target):
        execute(db.url, APP)
        for n in range(OLD_USERS):
            user = CARLA if n == 2 else ANA if n == 0 else str(uuid.UUID(int=n + 1000, version=4))
            add_user(
                db.url,
                user,
                f"{'ana' if user == ANA else 'carla' if user == CARLA else n}@ultima.mx",
                "2024-10-01",
            )
            execute(
                db.url,
                "INSERT INTO public.requests (id, profile_id, amount, created_at, updated_at) "
                "VALUES (%s, %s, 100, '2024-10-02', '2024-10-02')",
                n + 1,
                user,
            )
        execute(db.url, f"SELECT setval('public.requests_id_seq', {OLD_USERS})")
    add_user(target.url, TESTER, "tester@ultima.mx", "2024-11-25")
    for key in DEV_REQUESTS:
        execute(
            target.url,
            "INSERT INTO public.requests (id, profile_id, amount, created_at, updated_at) "
            "VALUES (%s, %s, -1, '2024-11-26', '2024-11-26')",
            key,
            TESTER,
        )
    execute(
        target.url,
        f"""
        SELECT setval('public.requests_id_seq', {max(DEV_REQUESTS)});
        CREATE TABLE public.notes (id serial PRIMARY KEY, profile_id uuid REFERENCES public.profiles
            ON DELETE CASCADE, body text);
        INSERT INTO public.notes (profile_id, body) VALUES ('{CARLA}', 'development''s note');
        """,
    )
    return source, target


def test_a_live_production_arrives_whole_and_its_deletes_are_found_and_applied(live):
    source, target = live
    load = Load()
    writer = threading.Thread(target=generate, args=(source.url, load), daemon=True)
    started = time.monotonic()
    writer.start()
    runs = [sync(source, target, since=SINCE)]
    while writer.is_alive():
        runs.append(sync(source, target))
    writer.join()
    assert load.error is None, load.error
    assert all(r.exit_code in (0, 3) for r in runs)

    dev_users = {TESTER}
    on_target = {r[0] for r in fetch(target.url, "SELECT id::text FROM auth.users")}
    in_source = {r[0] for r in fetch(source.url, "SELECT id::text FROM auth.users")}
    gone_users = on_target - in_source - dev_users
    final = sync(source, target, DeleteMode.APPLY)
    assert final.exit_code == 0, [q.error for q in (final.auth.quarantine if final.auth else [])]
    assert final.deletes is not None and final.deletes.users is not None
    assert (final.deletes.users.found, final.deletes.users.deleted) == (len(gone_users), len(gone_users))

    with psycopg.connect(target.url) as conn:
        users = copy_into_target(
            source,
            conn,
            "p_users",
            "SELECT id, email, encrypted_password FROM auth.users",
            "id uuid, email text, encrypted_password text",
        )
        identities = copy_into_target(
            source,
            conn,
            "p_identities",
            "SELECT user_id, provider, provider_id FROM auth.identities",
            "user_id uuid, provider text, provider_id text",
        )
        profiles = copy_into_target(
            source,
            conn,
            "p_profiles",
            "SELECT id, name, created_at, updated_at FROM public.profiles",
            "id uuid, name text, created_at timestamptz, updated_at timestamptz",
        )
        requests = copy_into_target(
            source,
            conn,
            "p_requests",
            "SELECT id, profile_id, amount, created_at, updated_at FROM public.requests",
            "id bigint, profile_id uuid, amount integer, created_at timestamptz, updated_at timestamptz",
        )
        differing = {
            "users": "SELECT id, email, encrypted_password FROM p_users "
            "EXCEPT SELECT id, email, encrypted_password FROM auth.users",
            "identities": "SELECT user_id, provider, provider_id FROM p_identities "
            "EXCEPT SELECT user_id, provider, provider_id FROM auth.identities",
            "profiles": "SELECT * FROM p_profiles "
            "EXCEPT SELECT id, name, created_at, updated_at FROM public.profiles",
            # A production request is the target row the ledger names (its own key when never remapped).
            "requests": "SELECT p.profile_id, p.amount, p.created_at, p.updated_at FROM p_requests AS p "
            "LEFT JOIN _sync.landed AS l ON l.table_name = 'public.requests' AND l.source_key = p.id::text "
            "WHERE NOT EXISTS (SELECT FROM public.requests AS t "
            "WHERE t.id = coalesce(l.target_key::bigint, p.id) AND (t.profile_id, t.amount, t.created_at, "
            "t.updated_at) = (p.profile_id, p.amount, p.created_at, p.updated_at))",
        }
        mismatches = {
            name: conn.execute(f"SELECT count(*) FROM ({q}) AS x").fetchone()[0]
            for name, q in differing.items()
        }
        extra = {
            "users": conn.execute(
                "SELECT count(*) FROM auth.users WHERE id NOT IN (SELECT id FROM p_users) AND id <> %s",
                (TESTER,),
            ).fetchone()[0],
            "profiles": conn.execute(
                "SELECT count(*) FROM public.profiles "
                "WHERE id NOT IN (SELECT id FROM p_profiles) AND id <> %s",
                (TESTER,),
            ).fetchone()[0],
            "requests": conn.execute(
                "SELECT count(*) FROM public.requests WHERE id <> ALL(%s)", (list(DEV_REQUESTS),)
            ).fetchone()[0]
            - requests,
        }
        dev_rows = conn.execute(
            "SELECT (SELECT count(*) FROM public.requests WHERE id = ANY(%s) AND amount = -1), "
            "(SELECT count(*) FROM public.notes), (SELECT count(*) FROM auth.users WHERE id = %s)",
            (list(DEV_REQUESTS), TESTER),
        ).fetchone()

    print(
        f"\nlive production: {load.writes} writes in {LOAD_SECONDS:.0f} s ({load.signups} sign-ups, "
        f"{load.deleted_users} users and {load.deleted_requests} requests deleted); {len(runs)} runs "
        f"during the load; compared {users} users, {identities} identities, {profiles} profiles, "
        f"{requests} requests; "
        f"production deletes applied: {final.deletes.users.deleted} users, "
        + ", ".join(f"{d.deleted} {d.table}" for d in final.deletes.tables)
        + f"; {time.monotonic() - started:.1f} s in all"
    )
    assert mismatches == {"users": 0, "identities": 0, "profiles": 0, "requests": 0}, "missing or different"
    assert extra == {"users": 0, "profiles": 0, "requests": 0}, "duplicated, or production deletes left"
    assert dev_rows == (len(DEV_REQUESTS), 1, 1), "development's rows untouched"
    assert load.signups > 0 and load.deleted_users > 0 and len(runs) >= 3
