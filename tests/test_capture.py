"""Catch-up runs find what production changed by transaction, not by the app's clock columns."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import asyncpg
import psycopg
from queries import SEED_MAPPING, execute, fetch

from sync.auth import AuthOptions
from sync.auth.source import read_only_snapshot
from sync.connect import Endpoint, Side
from sync.mapping import Mapping, load_mapping
from sync.plan.load import load_plan
from sync.run import RunOptions, RunReport, auth_import, run_sync
from sync.selection import XID_SPAN, Changes, Selection
from sync.sqltext import Params

SINCE = datetime(2024, 11, 18, tzinfo=UTC)

NOTES = """
CREATE TABLE notes (
    id uuid PRIMARY KEY,
    body text NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz
);
"""

# Three rows dated after --since (one without a date at all), as a first run finds them.
NOTES_ROWS = """
INSERT INTO notes VALUES
    ('00000000-0000-0000-0000-000000000001', 'one', '2024-12-01', '2024-12-01'),
    ('00000000-0000-0000-0000-000000000002', 'two', '2024-12-01', '2024-12-01'),
    ('00000000-0000-0000-0000-000000000003', 'undated', '2024-12-01', NULL);
"""


def run(source, target, mapping: Mapping | None = None, auth: bool = False, **options) -> RunReport:
    return asyncio.run(
        run_sync(
            Endpoint.parse(Side.SOURCE, source.url),
            Endpoint.parse(Side.TARGET, target.url),
            mapping or Mapping.model_validate({}),
            RunOptions(**options),
            auth_stage=auth_import(AuthOptions()) if auth else None,
        )
    )


def bodies(url: str) -> list[tuple]:
    return fetch(url, "SELECT id::text, body FROM notes ORDER BY id")


def first_run(make_db):
    source, target = make_db(), make_db()
    for db in (source, target):
        execute(db.url, NOTES)
    execute(source.url, NOTES_ROWS)
    assert run(source, target, since=SINCE).exit_code == 0
    assert bodies(target.url) == bodies(source.url)
    return source, target


def written(report: RunReport) -> tuple[int, int]:
    """(inserted, updated). Rows read may be more: a transaction running anywhere on the source's
    server holds its snapshots' xmin back, and rows written after it are read again (and left alone)."""
    return sum(t.inserted for t in report.tables), sum(t.updated for t in report.tables)


def test_an_edit_that_leaves_updated_at_alone_is_caught(make_db):
    source, target = first_run(make_db)
    execute(source.url, "UPDATE notes SET body = 'edited by a script' WHERE body = 'one'")
    report = run(source, target)
    assert written(report) == (0, 1), "only the edited row is written"
    assert bodies(target.url) == bodies(source.url)


def test_a_transaction_open_across_a_run_and_committed_later_is_caught_by_the_next(make_db):
    source, target = first_run(make_db)
    # The app stamps updated_at with its transaction's start (long before the overlap), and commits
    # only after a catch-up took its snapshot.
    late = psycopg.connect(source.url)
    late.execute("UPDATE notes SET body = 'committed late', updated_at = '2024-12-02' WHERE body = 'two'")
    try:
        assert written(run(source, target)) == (0, 0), "the open transaction's edit is not visible yet"
    finally:
        late.commit()
        late.close()
    run(source, target)
    assert bodies(target.url) == bodies(source.url)


def test_rows_without_a_since_value_are_caught_when_they_change_and_only_then(make_db):
    source, target = first_run(make_db)
    assert written(run(source, target)) == (0, 0), "an unchanged undated row is left alone"
    execute(
        source.url,
        """
        UPDATE notes SET body = 'undated, edited' WHERE updated_at IS NULL;
        INSERT INTO notes VALUES ('00000000-0000-0000-0000-000000000004', 'new, undated', '2020-01-01', NULL);
        """,
    )
    report = run(source, target)
    assert (report.tables[0].inserted, report.tables[0].updated) == (1, 1)
    assert bodies(target.url) == bodies(source.url)


def test_a_table_whose_since_column_is_created_at_still_brings_its_edits(make_db):
    source, target = first_run(make_db)
    mapping = Mapping.model_validate({"tables": {"public.notes": {"since": "created_at"}}})
    execute(source.url, "UPDATE notes SET body = 'edited', updated_at = now() WHERE body = 'one'")
    run(source, target, mapping)
    assert bodies(target.url) == bodies(source.url)


def test_each_run_records_its_snapshots_xmin_as_a_64_bit_id(make_db):
    source, target = first_run(make_db)
    recorded, current = (
        fetch(target.url, "SELECT snapshot_xmin FROM _sync.runs")[0][0],
        fetch(source.url, "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")[0][0],
    )
    assert 0 < recorded <= current


def test_the_change_test_holds_across_a_wraparound_of_32_bit_ids(supabase_db):
    """Seen in SQL: the previous snapshot just below 2^32 and this one past it (the server's own next id
    in the next epoch), rows written before and after the wrap, and one not yet written."""
    next_xid = "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint"
    (upto,) = fetch_values(supabase_db.url, next_xid, [])[0]
    assert 100 < upto < 2**31
    changes = Changes(from_xid=XID_SPAN - 10, upto_xid=XID_SPAN + upto)
    params = Params()
    test = changes.sql(params, "r.")
    written = [4294967280, 4294967290, 5, upto // 2, upto - 1, upto + 10**6]
    rows = fetch_values(
        supabase_db.url,
        f"SELECT r.xmin::text::bigint, {test} FROM unnest($%d::bigint[]) AS w, "
        f"LATERAL (SELECT w::text::xid AS xmin) AS r" % (len(params.values) + 1),
        [*params.values, written],
    )
    assert rows == [(w, w not in (4294967280, upto + 10**6)) for w in written]
    assert Changes(from_xid=1, upto_xid=XID_SPAN).sql(Params()) == "true", "a span too wide to tell"


def fetch_values(url: str, query: str, values: list) -> list[tuple]:
    """Rows of ``query``, with the engine's ``$n`` parameters."""

    async def go() -> list[tuple]:
        conn = await asyncpg.connect(url)
        try:
            return [tuple(r) for r in await conn.fetch(query, *values)]
        finally:
            await conn.close()

    return asyncio.run(go())


def test_an_identity_added_to_an_old_user_is_a_change_of_that_user(seed_dbs):
    source, target = seed_dbs
    mapping = load_mapping(SEED_MAPPING)
    assert run(source, target, mapping, auth=True, since=SINCE).exit_code == 0
    old = fetch(
        source.url,
        "SELECT id FROM auth.users WHERE created_at < '2024-01-01' AND updated_at < '2024-01-01' "
        "AND (last_sign_in_at IS NULL OR last_sign_in_at < '2024-01-01') ORDER BY id LIMIT 1",
    )[0][0]
    execute(
        source.url,
        "INSERT INTO auth.identities (provider_id, user_id, identity_data, provider, created_at, updated_at) "
        "VALUES ('google-subject-7', %s, jsonb_build_object('sub', 'google-subject-7'), 'google', "
        "'2023-06-01', '2023-06-01')",
        old,
    )
    report = run(source, target, mapping, auth=True)
    assert report.auth is not None and report.auth.source_users == 1
    assert fetch(
        target.url, "SELECT count(*) FROM auth.identities WHERE provider_id = 'google-subject-7'"
    ) == [(1,)]


def test_plan_warns_for_each_since_column_nothing_on_the_source_maintains(make_db):
    from sync.preview import preview

    source, target = make_db(), make_db()
    for db in (source, target):
        execute(
            db.url,
            NOTES + "CREATE TABLE tags (id uuid PRIMARY KEY, label text, created_at timestamptz NOT NULL);"
            "CREATE TABLE kept (id uuid PRIMARY KEY, label text, updated_at timestamptz);",
        )
    execute(
        source.url,
        """
        CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS
            $$ BEGIN NEW.updated_at := now(); RETURN NEW; END $$;
        CREATE TRIGGER kept_touch BEFORE UPDATE ON kept FOR EACH ROW EXECUTE FUNCTION touch();
        """,
    )
    ends = Endpoint.parse(Side.SOURCE, source.url), Endpoint.parse(Side.TARGET, target.url)
    report = asyncio.run(preview(*ends, Mapping.model_validate({}), SINCE))
    unmaintained = sorted(w.split(":")[0] for w in report.warnings if "is not maintained" in w)
    assert unmaintained == ["public.notes", "public.tags"]
    assert any("public.tags: since-column created_at" in w for w in report.warnings)


def _plan_nodes(node: dict) -> list[dict]:
    return [node, *(n for child in node.get("Plans", []) for n in _plan_nodes(child))]


def test_the_users_a_catch_up_reads_are_found_by_joins_the_planner_does_not_repeat_per_user(seed_dbs):
    """At any ``work_mem``, a changed identity selects its user through a join, never a per-user subquery."""
    source, _ = seed_dbs

    async def explain() -> list[dict]:
        conn = await asyncpg.connect(source.url)
        try:
            await conn.execute("SET work_mem = '64kB'")
            changes = Changes(from_xid=1, upto_xid=2**20)
            async with read_only_snapshot(conn, SINCE, changes=changes) as snapshot:
                window = snapshot._window
                params = snapshot._params
                plan = await conn.fetchval(
                    f"EXPLAIN (FORMAT JSON) SELECT id FROM auth.users{window}", *params
                )
        finally:
            await conn.close()
        return _plan_nodes(json.loads(plan)[0]["Plan"])

    nodes = asyncio.run(explain())
    assert any(n.get("Relation Name") == "identities" for n in nodes), "identities are read"
    per_row = [n for n in nodes if n.get("Parent Relationship") == "SubPlan"]
    assert not per_row, f"a subquery run per user: {per_row[0].get('Subplan Name')}"


def test_a_row_the_previous_snapshot_saw_is_not_read_again_though_its_transaction_is_newer(make_db):
    """Committed before the run's snapshot while an older transaction was still open: its id is at or
    above the snapshot's xmin, yet the snapshot saw it. A later catch-up leaves it alone, so a row
    development deleted after it landed stays deleted."""
    source, target = make_db(), make_db()
    for db in (source, target):
        execute(db.url, NOTES)
    older = psycopg.connect(source.url)
    try:
        older.execute("SELECT pg_current_xact_id()")  # holds every snapshot's xmin back from here
        execute(source.url, NOTES_ROWS)
        assert run(source, target, since=SINCE).exit_code == 0
    finally:
        older.rollback()
        older.close()
    assert bodies(target.url) == bodies(source.url)
    execute(target.url, "DELETE FROM notes WHERE body = 'two'")
    report = run(source, target)
    assert sum(t.read for t in report.tables) == 0, "nothing changed in production since the first run"
    assert [b for _, b in bodies(target.url)] == ["one", "undated"], "development's delete stands"


def test_a_catch_up_reads_only_the_tables_with_changes_and_their_parents(make_db):
    source, target = make_db(), make_db()
    schema = """
    CREATE TABLE threads (id bigint PRIMARY KEY, title text, updated_at timestamptz);
    CREATE TABLE posts (id bigint PRIMARY KEY, thread_id bigint REFERENCES threads, body text,
        updated_at timestamptz);
    CREATE TABLE tags (id bigint PRIMARY KEY, name text, updated_at timestamptz);
    """
    rows = """
    INSERT INTO threads VALUES (1, 'old thread', '2024-01-01'), (2, 'new thread', '2024-12-01');
    INSERT INTO posts VALUES (1, 2, 'hello', '2024-12-01');
    INSERT INTO tags VALUES (1, 'news', '2024-12-01');
    """
    for db in (source, target):
        execute(db.url, schema)
    execute(target.url, "INSERT INTO threads VALUES (1, 'old thread', '2024-01-01')")
    execute(source.url, rows)
    preserve = {"key": "preserve"}
    mapping = Mapping.model_validate(
        {"tables": {f"public.{t}": preserve for t in ("threads", "posts", "tags")}}
    )
    assert run(source, target, mapping, since=SINCE).exit_code == 0
    quiet = run(source, target, mapping)
    assert {t.table: t.quiet for t in quiet.tables} == {
        "public.threads": True,
        "public.posts": True,
        "public.tags": True,
    }
    # A reply in the old thread (its since-column untouched: found by transaction), whose thread
    # development deleted: the thread comes back through the closure, tags stay unread.
    execute(target.url, "DELETE FROM threads WHERE id = 1")
    execute(source.url, "INSERT INTO posts VALUES (2, 1, 'reply', '2024-01-02')")
    report = run(source, target, mapping)
    assert {t.table: t.quiet for t in report.tables} == {
        "public.threads": False,
        "public.posts": False,
        "public.tags": True,
    }
    by_table = {t.table: t for t in report.tables}
    assert (by_table["public.posts"].inserted, by_table["public.threads"].parents) == (1, 1)
    for table in ("threads", "posts", "tags"):
        query = f"SELECT * FROM {table} ORDER BY id"
        assert fetch(target.url, query) == fetch(source.url, query), table


def test_a_window_the_census_listed_is_read_through_the_key_index(make_db):
    """A catch-up's few changed rows are read by their keys, not by a scan of the whole table."""
    source, target = first_run(make_db)
    execute(
        source.url,
        "INSERT INTO notes SELECT gen_random_uuid(), 'old', '2020-01-01', '2020-01-01' "
        "FROM generate_series(1, 5000); ANALYZE notes",
    )
    ends = Endpoint.parse(Side.SOURCE, source.url), Endpoint.parse(Side.TARGET, target.url)
    plan = asyncio.run(load_plan(*ends, Mapping.model_validate({})))
    (notes,) = plan.tables
    keys = [r[0] for r in fetch(source.url, "SELECT id::text FROM notes WHERE body = 'two'")]
    listed = Changes(from_xid=1, upto_xid=2**20, keyed={notes.name: keys})

    async def explain(changes: Changes) -> list[dict]:
        params = Params()
        window = Selection(plan, SINCE, None, changes).in_window(notes, params)
        conn = await asyncpg.connect(source.url)
        try:
            found = await conn.fetch(f"SELECT body FROM notes WHERE {window}", *params.values)
            # Listed: the row with that key; not listed: every row a transaction since xid 1 wrote.
            assert [r["body"] for r in found] == ["two"] if changes.keyed else len(found) == 5003
            text = await conn.fetchval(
                f"EXPLAIN (FORMAT JSON) SELECT id FROM notes WHERE {window}", *params.values
            )
        finally:
            await conn.close()
        return _plan_nodes(json.loads(text)[0]["Plan"])

    for changes, scanned in ((listed, False), (Changes(from_xid=1, upto_xid=2**20), True)):
        nodes = asyncio.run(explain(changes))
        assert any(n["Node Type"] == "Seq Scan" for n in nodes) is scanned, nodes


def test_users_the_census_listed_are_read_by_primary_key_alone(seed_dbs):
    source, _ = seed_dbs
    (one,) = fetch(source.url, "SELECT id FROM auth.users ORDER BY created_at DESC LIMIT 1")

    async def read() -> tuple[list, list[dict]]:
        conn = await asyncpg.connect(source.url)
        try:
            changes = Changes(from_xid=1, upto_xid=2**20, keyed={"auth.users": [str(one[0])]})
            async with read_only_snapshot(conn, SINCE, changes=changes) as snapshot:
                keys = await snapshot.keys()
                plan = await conn.fetchval(
                    f"EXPLAIN (FORMAT JSON) SELECT id FROM auth.users{snapshot._window}", *snapshot._params
                )
        finally:
            await conn.close()
        return keys, _plan_nodes(json.loads(plan)[0]["Plan"])

    keys, nodes = asyncio.run(read())
    assert [k.id for k in keys] == [one[0]]
    assert {n.get("Relation Name") for n in nodes} == {"users"}, "identities are not read"
    assert not any(n["Node Type"] == "Seq Scan" for n in nodes)
