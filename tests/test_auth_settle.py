"""Matching settled in SQL on the target gives every production user the matcher's own answer.

Each case adds users that meet each other in one of the ways the matching rules speak of to the seed
scenario (production = source, development = target), then compares, user by user, the matcher over every
user of both sides with the direct mode's way: keys staged on the target, plain users settled in SQL, the
rest given to the same matcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import bcrypt
import psycopg
import pytest
from queries import seed_sync

from devkit.testbed import Database
from sync import census
from sync import run as run_module
from sync.auth import AuthOptions, MatchKind, import_users, match_users, settle
from sync.auth.match import read_id_map, read_target_keys
from sync.auth.report import hash_problem, plain_hash_sql
from sync.auth.settle import settle_users
from sync.auth.source import read_only_snapshot, read_source_keys
from sync.connect import Endpoint, Side, connect
from sync.pool import IdleConnections
from sync.snapshot import SourceSnapshot
from sync.state import ensure_state

User = tuple[uuid.UUID, str | None, str | None, dict[str, Any]]
"""id, e-mail, phone as stored, and other columns (``is_sso_user``, ``deleted_at``)."""


class Case:
    """Users to add on each side, earlier runs' mappings, and the target's deleted accounts."""

    def __init__(self) -> None:
        self.source: list[User] = []
        self.target: list[User] = []
        self.id_map: list[tuple[uuid.UUID, uuid.UUID]] = []
        self.deleted_accounts: list[uuid.UUID] = []
        self.ids: dict[str, uuid.UUID] = {}
        self.settled: set[str] = set()
        """Users of the case that SQL settles (every other one meets another user: the matcher decides)."""

    def id(self, name: str) -> uuid.UUID:
        return self.ids.setdefault(name, uuid.uuid4())

    def on_source(self, name: str, email: str | None, phone: str | None = None, **extra: Any) -> None:
        self.source.append((self.id(name), email, phone, extra))

    def on_target(self, name: str, email: str | None, phone: str | None = None, **extra: Any) -> None:
        self.target.append((self.id(name), email, phone, extra))


def case_variants(c: Case) -> None:
    """Addresses stored in another case, with spaces or a ``+``, on either side."""
    c.on_target("old variant", " Mixed@Case.com", created_at="2020-01-01")
    c.on_target("lower", "mixed@case.com")
    c.on_source("signs up again", "mixed@case.com")
    c.on_source("upper in production", "Other@Case.com ")
    c.on_target("other", "other@case.com")
    c.on_target("spaced phone", None, "+52 1 55 9999 0001")
    c.on_source("same phone", "phone.person@x.com", "5215599990001")


def moved_address(c: Case) -> None:
    """A same-id user moves to a new address; another user takes the one it left, or one someone holds."""
    c.on_target("mover", "left@x.com", "5215599990002")
    c.on_source("mover", "arrived@x.com", "5215599990002")
    c.on_source("takes the old address", "left@x.com")
    c.on_target("blocked", "mine@x.com")
    c.on_target("holder", "taken@x.com")
    c.on_source("blocked", "taken@x.com")


def shared_addresses(c: Case) -> None:
    """Two production users on one e-mail, and two on one phone (as stored, in different forms)."""
    c.on_source("first", "shared@x.com")
    c.on_source("second", "Shared@x.com")
    c.on_source("first phone", "a@phone.com", "5215599990003")
    c.on_source("second phone", "b@phone.com", "+5215599990003")


def mapped_users(c: Case) -> None:
    """An earlier run's mapping, one whose target user another user now has by id, and one to a user gone."""
    c.on_target("mapped target", "mapped@x.com")
    c.on_source("mapped", "someone.else@x.com")
    c.id_map.append((c.id("mapped"), c.id("mapped target")))
    c.on_target("claimed by id", "claimed@x.com")
    c.on_source("claimed by id", "claimed@x.com")
    c.on_source("mapped to a claimed one", "late@x.com")
    c.id_map.append((c.id("mapped to a claimed one"), c.id("claimed by id")))
    c.on_source("mapped to a user gone", "orphan@x.com")
    c.id_map.append((c.id("mapped to a user gone"), uuid.uuid4()))


def deleted_and_sso(c: Case) -> None:
    """Deleted and SSO production users on held addresses, and an address of a deleted account."""
    c.on_target("holder", "held@x.com", "5215599990004")
    c.on_source("deleted", "held@x.com", "5215599990004", deleted_at=datetime(2024, 12, 1, tzinfo=UTC))
    c.on_source("sso", "held@x.com", None, is_sso_user=True)
    c.on_target("gone", "gone@x.com")
    c.deleted_accounts.append(c.id("gone"))
    c.on_source("new person", "gone@x.com")


def sso_target_users(c: Case) -> None:
    """SSO target users: no one's candidate by e-mail, so sharing only their e-mail settles a user; by
    phone they are candidates like anyone."""
    c.on_target("sso holder", "sso.only@x.com", is_sso_user=True)
    c.on_source("meets an sso user", "sso.only@x.com")
    c.settled.add("meets an sso user")
    c.on_target("sso by id", "sso.by.id@x.com", is_sso_user=True)
    c.on_source("sso by id", "sso.moved@x.com")
    c.on_source("takes the sso address", "sso.by.id@x.com")
    c.settled.update({"sso by id", "takes the sso address"})
    c.on_target("sso phone", "sso.phone@x.com", "5215599990005", is_sso_user=True)
    c.on_source("same phone as sso", "phone.of.sso@x.com", "5215599990005")


def held_in_another_form(c: Case) -> None:
    """Same-id users whose target address a production user claims in another form (case, a ``+``)."""
    c.on_target("keeper", "kept@x.com")
    c.on_source("keeper", "moved.on@x.com")
    c.on_source("claims it in capitals", "Kept@X.com")
    c.on_target("phone keeper", "phone.keeper@x.com", "5215599990006")
    c.on_source("phone keeper", "phone.keeper@x.com", "5215599990007")
    c.on_source("claims it with a plus", "plus@x.com", "+5215599990006")


CASES: dict[str, Callable[[Case], None]] = {
    f.__name__: f
    for f in (
        case_variants,
        moved_address,
        shared_addresses,
        mapped_users,
        deleted_and_sso,
        sso_target_users,
        held_in_another_form,
    )
}


def _add(db: Database, users: list[User]) -> None:
    start = datetime(2024, 12, 1, tzinfo=UTC)
    with psycopg.connect(db.admin_url, autocommit=True) as conn:
        for n, (user_id, email, phone, extra) in enumerate(users):
            columns = {
                "id": user_id,
                "email": email,
                "phone": phone,
                "created_at": start + timedelta(minutes=n),
                "encrypted_password": "",
                **extra,
            }
            names = ", ".join(columns)
            marks = ", ".join(["%s"] * len(columns))
            conn.execute(f"INSERT INTO auth.users ({names}) VALUES ({marks})", list(columns.values()))


@pytest.mark.parametrize("build", CASES.values(), ids=list(CASES))
async def test_users_settled_in_sql_get_the_matchers_answer(
    build: Callable[[Case], None], seed_dbs: tuple[Database, Database]
) -> None:
    source, target = seed_dbs
    case = Case()
    build(case)
    _add(source, case.source)
    _add(target, case.target)
    sconn = await connect(Endpoint.parse(Side.SOURCE, source.admin_url))
    tconn = await connect(Endpoint.parse(Side.TARGET, target.admin_url))
    try:
        await ensure_state(tconn)
        await tconn.executemany(
            "INSERT INTO _sync.id_map (table_name, source_key, target_key, reason) "
            "VALUES ('auth.users', $1, $2, 'email')",
            [(str(s), str(t)) for s, t in case.id_map],
        )
        async with sconn.transaction(isolation="repeatable_read", readonly=True):
            keys = await read_source_keys(sconn)
            async with read_only_snapshot(sconn) as snapshot:
                settled = await settle_users(snapshot, tconn, case.deleted_accounts)
        everyone = match_users(
            keys, await read_target_keys(tconn), await read_id_map(tconn), case.deleted_accounts
        )
    finally:
        await sconn.close()
        await tconn.close()

    assert settled.all_matches([k.id for k in keys]) == everyone
    # Every user of the case meets another, so the matcher decides it; most seed users are settled.
    settled_ids = {case.ids[name] for name in case.settled}
    assert {user_id for user_id, *_ in case.source} - settled_ids <= set(settled.matches)
    assert not settled_ids & set(settled.matches)
    assert len(settled.matches) < len(keys) // 4 and settled.copied
    kinds = {m.kind for m in everyone if m.source_id in {u for u, *_ in case.source}}
    assert kinds - {MatchKind.NEW}, "each case has users the matcher does not simply create"


@pytest.mark.parametrize(
    ("cut", "readers"),
    [(False, ["sync writer"]), (True, ["sync writer", "sync"])],
    ids=["read ahead", "read ahead cut"],
)
def test_a_run_reads_the_target_users_stored_otherwise_ahead_and_matches_by_them(
    cut: bool, readers: list[str], seed_dbs: tuple[Database, Database], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run reads the target's users stored otherwise on a table writer's connection while it reads
    production, and settles with them (not reading them again): a production user meets the development
    user holding its address in another case. When that read's connection is lost, the import reads them
    itself. A catch-up with no user changed does not read them."""
    source, target = seed_dbs
    case = Case()
    case.on_target("casey", "Casey@Example.com")
    case.on_source("casey in production", "casey@example.com")
    _add(target, case.target)
    _add(source, case.source)
    seen: list[str] = []
    read = settle.stored_otherwise

    async def noted(conn: asyncpg.Connection) -> settle.StoredOtherwise:
        seen.append(conn.get_settings().application_name)
        if cut and len(seen) == 1:
            conn.terminate()  # the connection lost under the read ahead
        return await read(conn)

    monkeypatch.setattr(settle, "stored_otherwise", noted)
    report = seed_sync(source, target, since=datetime(2024, 11, 18, tzinfo=UTC))

    assert report.exit_code == 0
    assert seen == readers
    mapped = "SELECT target_key FROM _sync.id_map WHERE table_name = 'auth.users' AND source_key = %s::text"
    assert _fetch(target, mapped, case.id("casey in production")) == [(str(case.id("casey")),)]
    holders = "SELECT count(*) FROM auth.users WHERE lower(email) = 'casey@example.com'"
    assert _fetch(target, holders) == [(1,)]
    # A catch-up whose census finds no user changed reads no target user; one that finds a user changed
    # reads them while the census counts the other tables.
    caught_up = seed_sync(source, target, overlap=timedelta(0))
    assert (caught_up.exit_code, caught_up.auth.source_users, seen) == (0, 0, readers)
    counted = census.take_census

    async def noted_census(*args: Any) -> census.Census:
        taken = await counted(*args)
        seen.append("census taken")
        return taken

    started = run_module.stored_otherwise_ahead
    heard: list[asyncio.Event] = []

    def started_event() -> asyncio.Event:
        if not heard:
            heard.append(asyncio.Event())
        return heard[0]

    def noted_start(connections: IdleConnections) -> Coroutine[Any, Any, settle.StoredOtherwise]:
        seen.append("read ahead")
        started_event().set()
        return started(connections)

    tally = census.tally

    async def held_tally(conn: asyncpg.Connection, table: str, *args: Any) -> dict[str, Any]:
        # The identities' count (no identity changed) ends only once the read ahead has started, or 5 s
        # later: the users' count, which found the user changed, starts it without waiting for this one.
        if table == "auth.identities":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(started_event().wait(), 5)
            seen.append("identities counted")
        return await tally(conn, table, *args)

    monkeypatch.setattr(run_module, "take_census", noted_census)
    monkeypatch.setattr(run_module, "stored_otherwise_ahead", noted_start)
    monkeypatch.setattr(census, "tally", held_tally)
    _fetch(
        source,
        "UPDATE auth.users SET raw_user_meta_data = '{\"a\": 1}' WHERE id = %s",
        case.id("casey in production"),
    )
    caught_up = seed_sync(source, target, overlap=timedelta(0))
    assert (caught_up.exit_code, caught_up.auth.source_users) == (0, 1)
    later = seen[len(readers) :]
    assert later.index("read ahead") < later.index("census taken") and later.count("sync writer") == 1, later
    assert later.index("read ahead") < later.index("identities counted"), later


def _written(db: Database, leaving_out: uuid.UUID) -> list[tuple[Any, ...]]:
    """Every auth user and identity, and the ledger of users, but those of one user."""
    return _fetch(
        db,
        "SELECT (SELECT md5(string_agg(u::text, '|' ORDER BY u.id)) FROM auth.users AS u WHERE u.id <> %s), "
        "(SELECT md5(string_agg(i::text, '|' ORDER BY i.id)) FROM auth.identities AS i "
        "WHERE i.user_id <> %s), "
        "(SELECT md5(string_agg(l.source_key || l.target_key, '|' ORDER BY l.source_key)) "
        "FROM _sync.landed AS l WHERE l.table_name = 'auth.users' AND l.source_key <> %s::text)",
        leaving_out,
        leaving_out,
        leaving_out,
    )


def _fetch(db: Database, query: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(db.admin_url, autocommit=True) as conn:
        cur = conn.execute(query, args or None)
        return cur.fetchall() if cur.description else []


# Each connection that writes users, created or matched (a statement trigger: COPY stays the way in,
# and an UPDATE that changes no row is noted too).
_WRITERS = """
CREATE TABLE public.user_writers (pid int);
CREATE FUNCTION public.note_writer() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO public.user_writers VALUES (pg_backend_pid()); RETURN NULL; END $$;
CREATE TRIGGER note_writer AFTER INSERT OR UPDATE ON auth.users
    FOR EACH STATEMENT EXECUTE FUNCTION public.note_writer();
"""
_REFUSE_ONE = """
CREATE FUNCTION public.refuse_one() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN IF new.id = '{refused}' THEN RAISE EXCEPTION 'refused'; END IF; RETURN new; END $$;
CREATE TRIGGER refuse_one AFTER INSERT ON auth.users FOR EACH ROW EXECUTE FUNCTION public.refuse_one();
"""


async def _import(source: Database, target: Database, jobs: int = 1) -> Any:
    """The direct import; with more than one job, inside a run's exported snapshot (as a run does)."""
    source_endpoint = Endpoint.parse(Side.SOURCE, source.url)
    target_endpoint = Endpoint.parse(Side.TARGET, target.url)
    if jobs == 1:
        return await import_users(source_endpoint, target_endpoint, AuthOptions())
    snapshot = await SourceSnapshot(source_endpoint).open()
    try:
        # Batches smaller than the groups a scenario this small splits into, so that each job has one.
        options = AuthOptions(jobs=jobs, batch_size=500)
        return await import_users(source_endpoint, target_endpoint, options, snapshot=snapshot)
    finally:
        await snapshot.close()


async def test_users_created_by_copy_are_written_as_the_batches_write_them(
    make_db: Callable[..., Database], seed_templates: tuple[str, str]
) -> None:
    source = make_db(seed_templates[0])
    by_copy, by_batches = make_db(seed_templates[1]), make_db(seed_templates[1])
    copied = await _import(source, by_copy)
    # A trigger refusing one created user makes its whole COPY group go through the batches instead (the
    # last user created under its own id: the groups land after the users the batches write).
    there = {r[0] for r in _fetch(by_batches, "SELECT id FROM auth.users")}
    landed = _fetch(
        by_copy,
        "SELECT source_key::uuid FROM _sync.landed WHERE source_key = target_key "
        "ORDER BY landed_at DESC, source_key",
    )
    refused = next(r[0] for r in landed if r[0] not in there)
    _fetch(by_batches, _REFUSE_ONE.format(refused=refused))
    batched = await _import(source, by_batches)

    assert batched.quarantined == 1 and batched.quarantine[0].source_id == refused and copied.quarantined == 0
    assert (batched.created, batched.identities_created) < (copied.created, copied.identities_created)
    assert batched.created == copied.created - 1
    assert _written(by_batches, refused) == _written(by_copy, refused)


async def test_users_matched_by_id_through_copy_are_written_as_the_batches_write_them(
    make_db: Callable[..., Database], seed_templates: tuple[str, str]
) -> None:
    source = make_db(seed_templates[0])
    by_copy, by_batches = make_db(seed_templates[1]), make_db(seed_templates[1])
    there = [r[0] for r in _fetch(by_batches, "SELECT id FROM auth.users")]
    # A user on both sides with a plain hash: one the COPY groups match by id. The ledger refusing it
    # makes its whole group go through the batches instead.
    ((refused,),) = _fetch(
        source,
        "SELECT id FROM auth.users WHERE id = ANY (%s) AND encrypted_password LIKE '$2_$%%' "
        "ORDER BY created_at DESC LIMIT 1",
        there,
    )
    conn = await connect(Endpoint.parse(Side.TARGET, by_batches.url))  # the state as the import makes it
    try:
        await ensure_state(conn)
    finally:
        await conn.close()
    _fetch(
        by_batches,
        f"""
        CREATE FUNCTION public.refuse_ledger() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN IF new.source_key = '{refused}' THEN RAISE EXCEPTION 'refused'; END IF; RETURN new; END $$;
        CREATE TRIGGER refuse_ledger AFTER INSERT ON _sync.landed
            FOR EACH ROW EXECUTE FUNCTION public.refuse_ledger();
        """,
    )

    copied = await _import(source, by_copy)
    batched = await _import(source, by_batches)

    assert [q.source_id for q in batched.quarantine] == [refused] and copied.quarantined == 0
    assert batched.matched_by_id == copied.matched_by_id - 1 and copied.updated > 0
    assert (batched.updated, batched.unchanged) in {
        (copied.updated, copied.unchanged - 1),
        (copied.updated - 1, copied.unchanged),
    }
    assert batched.identities_created == copied.identities_created
    assert _written(by_batches, refused) == _written(by_copy, refused)


async def test_users_created_on_several_connections_at_once_are_written_as_on_one(
    make_db: Callable[..., Database], seed_templates: tuple[str, str]
) -> None:
    source = make_db(seed_templates[0])
    serial, at_once = make_db(seed_templates[1]), make_db(seed_templates[1])
    _fetch(at_once, _WRITERS)

    one = await _import(source, serial)
    many = await _import(source, at_once, jobs=4)

    assert (many.created, many.identities_created, many.quarantined) == (
        one.created,
        one.identities_created,
        0,
    )
    assert _written(at_once, uuid.uuid4()) == _written(serial, uuid.uuid4())
    ((connections,),) = _fetch(at_once, "SELECT count(DISTINCT pid) FROM public.user_writers")
    assert connections == 4


async def test_a_group_refused_while_others_land_at_once_goes_through_the_batches_alone(
    make_db: Callable[..., Database], seed_templates: tuple[str, str]
) -> None:
    source = make_db(seed_templates[0])
    serial, at_once = make_db(seed_templates[1]), make_db(seed_templates[1])
    there = [r[0] for r in _fetch(serial, "SELECT id FROM auth.users")]
    # A new user with a plain bcrypt hash: one the COPY groups create.
    ((refused,),) = _fetch(
        source,
        "SELECT id FROM auth.users WHERE id <> ALL (%s) AND encrypted_password LIKE '$2_$%%' "
        "AND NOT is_sso_user AND deleted_at IS NULL ORDER BY created_at DESC LIMIT 1",
        there,
    )
    for target in (serial, at_once):
        _fetch(target, _REFUSE_ONE.format(refused=refused))
    _fetch(at_once, _WRITERS)

    one = await _import(source, serial)
    many = await _import(source, at_once, jobs=4)

    assert [q.source_id for q in many.quarantine] == [q.source_id for q in one.quarantine] == [refused]
    assert (many.created, many.identities_created) == (one.created, one.identities_created)
    assert _written(at_once, refused) == _written(serial, refused)
    ((connections,),) = _fetch(at_once, "SELECT count(DISTINCT pid) FROM public.user_writers")
    assert connections > 1


async def test_a_user_deleted_on_the_target_since_it_landed_is_created_again_and_its_ledger_entry_kept(
    seed_dbs: tuple[Database, Database],
) -> None:
    source, target = seed_dbs
    first = await _import(source, target)
    ((gone,),) = _fetch(
        target,
        "SELECT u.id FROM auth.users AS u JOIN _sync.landed AS l ON l.source_key = u.id::text "
        "WHERE l.table_name = 'auth.users' AND u.email IS NOT NULL AND u.deleted_at IS NULL "
        "ORDER BY u.created_at DESC LIMIT 1",
    )
    _fetch(target, "DELETE FROM public.profiles WHERE id = %s", gone)
    _fetch(target, "DELETE FROM auth.users WHERE id = %s", gone)

    again = await _import(source, target)

    assert first.created > 1 and (again.created, again.quarantined) == (1, 0)
    assert _fetch(target, "SELECT count(*) FROM auth.users WHERE id = %s", gone) == [(1,)]
    assert _fetch(
        target,
        "SELECT target_key FROM _sync.landed WHERE table_name = 'auth.users' AND source_key = %s::text",
        gone,
    ) == [(str(gone),)]


async def test_the_plain_hash_check_in_sql_agrees_with_the_report(supabase_db: Database) -> None:
    bcrypt_hash = bcrypt.hashpw(b"secret", bcrypt.gensalt(rounds=4)).decode()
    values = [
        "",
        bcrypt_hash,
        bcrypt_hash.replace("$2b$", "$2$"),
        bcrypt_hash.replace("$04$", "$32$"),
        bcrypt_hash.replace("$04$", "$03$"),
        bcrypt_hash.replace("$2b$04$", "$2y$31$"),
        bcrypt_hash.replace("$2b$", "$2x$"),
        bcrypt_hash[:-1],
        bcrypt_hash + "x",
        bcrypt_hash[:-1] + "!",
        "$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA",
        "{encrypted}",
        "plain text",
    ]
    conn = await connect(Endpoint.parse(Side.TARGET, supabase_db.admin_url))
    try:
        plain = await conn.fetchval(
            f"SELECT array_agg({plain_hash_sql('v')} ORDER BY n) FROM unnest($1::text[]) "
            "WITH ORDINALITY AS x(v, n)",
            values,
        )
    finally:
        await conn.close()
    assert plain == [True, True, True, False, False, True, False, False, False, False, False, False, False]
    assert all(hash_problem(v) is None for v, p in zip(values, plain, strict=True) if p)
