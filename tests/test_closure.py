"""The closure: every parent a copied row needs comes along, through self-references and long chains."""

from __future__ import annotations

import time

from queries import execute, fetch
from test_copy import run

FORUM = """
CREATE TABLE threads (id bigint PRIMARY KEY, title text NOT NULL, created_at timestamptz NOT NULL,
                      updated_at timestamptz NOT NULL);
CREATE TABLE messages (
    id bigint PRIMARY KEY,
    thread_id bigint NOT NULL REFERENCES threads (id),
    parent_id bigint REFERENCES messages (id),
    body text NOT NULL,
    created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL
);
"""

# Keys deliberately run against the chain (a parent has a higher id than its reply), so that key
# order, batch boundaries and the window cannot carry the chain by luck.
OLD_THREAD = """
INSERT INTO threads VALUES ({t}, 'thread {t}', '2024-01-01', '2024-01-01');
INSERT INTO messages VALUES ({root}, {t}, NULL, 'root of {t}', '2024-01-01', '2024-01-01'),
                            ({mid}, {t}, {root}, 'reply to {root}', '2024-01-02', '2024-01-02'),
                            ({leaf}, {t}, {mid}, 'reply to {mid}', '2024-01-03', '2024-01-03');
"""


def forum(source, target) -> None:
    """Both sides hold threads 1 and 2 from the copy; development has its own thread 9."""
    for db in (source, target):
        execute(db.url, FORUM)
        execute(db.url, OLD_THREAD.format(t=1, root=50, mid=20, leaf=30))
        execute(db.url, OLD_THREAD.format(t=2, root=80, mid=60, leaf=70))
    execute(
        target.url,
        """
        INSERT INTO threads VALUES (9, 'dev thread', '2024-11-25', '2024-11-25');
        INSERT INTO messages VALUES (900, 9, NULL, 'dev root', '2024-11-25', '2024-11-25');
    """,
    )


def messages(url: str) -> list[tuple]:
    return fetch(url, "SELECT id, thread_id, parent_id, body FROM messages ORDER BY id")


def test_a_reply_whose_thread_development_deleted_brings_back_its_whole_chain(make_db):
    source, target = make_db(), make_db()
    forum(source, target)
    # Development deleted thread 1; production got a reply at the end of its chain.
    execute(target.url, "DELETE FROM messages WHERE thread_id = 1; DELETE FROM threads WHERE id = 1")
    execute(source.url, "INSERT INTO messages VALUES (10, 1, 30, 'new reply', '2024-12-01', '2024-12-01')")

    report = run(source, target, batch_size=2)

    assert report.exit_code == 0, report.to_json()
    assert fetch(target.url, "SELECT count(*) FROM _sync.quarantine") == [(0,)]
    assert fetch(target.url, "SELECT id FROM threads ORDER BY id") == [(1,), (2,), (9,)]
    source_rows = {r for r in messages(source.url)}
    target_rows = set(messages(target.url))
    assert source_rows <= target_rows
    assert target_rows - source_rows == {(900, 9, None, "dev root")}


def test_a_catch_up_brings_back_the_chain_of_a_thread_deleted_after_the_first_run(make_db):
    source, target = make_db(), make_db()
    forum(source, target)
    assert run(source, target).exit_code == 0
    execute(target.url, "DELETE FROM messages WHERE thread_id = 2; DELETE FROM threads WHERE id = 2")
    execute(source.url, "INSERT INTO messages VALUES (11, 2, 70, 'late reply', now(), now())")

    report = run(source, target, since=None, batch_size=2)

    assert report.exit_code == 0, report.to_json()
    assert report.since is not None  # a catch-up, from the first run's mark
    assert fetch(target.url, "SELECT count(*) FROM _sync.quarantine") == [(0,)]
    assert set(messages(source.url)) <= set(messages(target.url))
    assert fetch(target.url, "SELECT title FROM threads WHERE id = 2") == [("thread 2",)]


def test_a_parent_out_of_the_window_is_brought_only_where_development_lacks_it(make_db):
    source, target = make_db(), make_db()
    forum(source, target)
    # Development deleted thread 1 and edited thread 2 and one of its messages, all out of the window;
    # production got a reply in each thread.
    execute(
        target.url,
        "DELETE FROM messages WHERE thread_id = 1; DELETE FROM threads WHERE id = 1; "
        "UPDATE threads SET title = 'renamed in development' WHERE id = 2; "
        "UPDATE messages SET body = 'edited in development' WHERE id = 70",
    )
    execute(
        source.url,
        "INSERT INTO messages VALUES (10, 1, 30, 'new reply', '2024-12-01', '2024-12-01'), "
        "(11, 2, 70, 'late reply', '2024-12-01', '2024-12-01')",
    )

    report = run(source, target, batch_size=2)

    assert report.exit_code == 0, report.to_json()
    tables = {t.table: t for t in report.tables}
    assert tables["public.threads"].parents == 2  # both threads are needed; only thread 1 was missing
    assert tables["public.threads"].inserted == 1
    assert tables["public.threads"].updated == 0
    assert fetch(target.url, "SELECT id, title FROM threads ORDER BY id") == [
        (1, "thread 1"),
        (2, "renamed in development"),
        (9, "dev thread"),
    ]
    assert fetch(target.url, "SELECT body FROM messages WHERE id IN (70, 30, 11) ORDER BY id") == [
        ("late reply",),
        ("reply to 20",),
        ("edited in development",),
    ]


CHAIN = """
CREATE TABLE orgs (id uuid PRIMARY KEY, name text NOT NULL, updated_at timestamptz NOT NULL);
CREATE TABLE teams (id uuid PRIMARY KEY, org_id uuid NOT NULL REFERENCES orgs (id), name text NOT NULL,
                    updated_at timestamptz NOT NULL);
CREATE TABLE projects (id uuid PRIMARY KEY, team_id uuid NOT NULL REFERENCES teams (id),
                       parent_id uuid REFERENCES projects (id), name text NOT NULL,
                       updated_at timestamptz NOT NULL);
CREATE TABLE tasks (id uuid PRIMARY KEY, project_id uuid NOT NULL REFERENCES projects (id),
                    name text NOT NULL, updated_at timestamptz NOT NULL);
"""


def uid(n: int) -> str:
    return f"00000000-0000-0000-0000-{n:012d}"


def test_a_new_row_at_the_end_of_a_chain_of_four_tables_brings_every_missing_ancestor(make_db):
    source, target = make_db(), make_db()
    for db in (source, target):
        execute(db.url, CHAIN)
    # Production only: an old organisation tree that development never had (or deleted). The new
    # task's project is a sub-project whose parent belongs to another team of another organisation.
    execute(
        source.url,
        f"""
        INSERT INTO orgs VALUES ('{uid(1)}', 'org one', '2023-01-01'), ('{uid(2)}', 'org two', '2023-01-01'),
                                ('{uid(3)}', 'unrelated org', '2023-01-01');
        INSERT INTO teams VALUES ('{uid(11)}', '{uid(1)}', 'team one', '2023-02-01'),
                                 ('{uid(12)}', '{uid(2)}', 'team two', '2023-02-01'),
                                 ('{uid(13)}', '{uid(3)}', 'unrelated team', '2023-02-01');
        INSERT INTO projects VALUES ('{uid(21)}', '{uid(11)}', NULL, 'parent project', '2023-03-01'),
                                    ('{uid(22)}', '{uid(12)}', '{uid(21)}', 'sub-project', '2023-03-02'),
                                    ('{uid(23)}', '{uid(13)}', NULL, 'unrelated project', '2023-03-03');
        INSERT INTO tasks VALUES ('{uid(31)}', '{uid(22)}', 'new task', '2024-12-01');
    """,
    )

    report = run(source, target, batch_size=1)

    assert report.exit_code == 0, report.to_json()
    assert fetch(target.url, "SELECT name FROM orgs ORDER BY id") == [("org one",), ("org two",)]
    assert fetch(target.url, "SELECT name FROM teams ORDER BY id") == [("team one",), ("team two",)]
    assert fetch(target.url, "SELECT name, parent_id::text FROM projects ORDER BY id") == [
        ("parent project", None),
        ("sub-project", uid(21)),
    ]
    assert fetch(target.url, "SELECT name FROM tasks") == [("new task",)]
    # A catch-up: a new task on the unrelated project brings its team and organisation too.
    execute(source.url, f"INSERT INTO tasks VALUES ('{uid(32)}', '{uid(23)}', 'later task', now())")
    catch_up = run(source, target, since=None, batch_size=1)
    assert catch_up.exit_code == 0, catch_up.to_json()
    for table in ("orgs", "teams", "projects", "tasks"):
        everything = f"SELECT * FROM {table} ORDER BY id"
        assert fetch(target.url, everything) == fetch(source.url, everything)


OWNERS = """
CREATE TABLE owners (id bigint PRIMARY KEY, name text NOT NULL, updated_at timestamptz NOT NULL);
CREATE TABLE pets (id bigint PRIMARY KEY, owner_id bigint NOT NULL REFERENCES owners (id),
                   updated_at timestamptz NOT NULL);
CREATE TABLE visits (id bigint PRIMARY KEY, owner_id bigint NOT NULL REFERENCES owners (id),
                     updated_at timestamptz NOT NULL);
"""


def owner_scans(url: str) -> tuple[int, int]:
    """(index scans, sequential scans) of the owners table so far, once no session holds any unsent."""
    for _ in range(100):
        if fetch(url, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()") == [(1,)]:
            break
        time.sleep(0.05)
    ((index, seq),) = fetch(
        url, "SELECT idx_scan, seq_scan FROM pg_stat_user_tables WHERE relname = 'owners'"
    )
    return index, seq


def test_a_full_runs_closure_joins_a_large_parent_table_by_hash_not_a_probe_per_key(make_db):
    """Thousands of new pets and visits each need an old owner out of the window: the closure's listing
    reads the owners once. The planner takes the closure (the union of what both tables need) for 200
    keys, and would probe the key index once per key."""
    source, target = make_db(), make_db()
    for db in (source, target):
        execute(db.url, OWNERS)
    execute(
        source.url,
        "INSERT INTO owners SELECT n, 'owner ' || n, '2024-01-01' FROM generate_series(1, 120000) AS n; "
        "INSERT INTO pets SELECT n, n * 37, '2024-12-01' FROM generate_series(1, 1500) AS n; "
        "INSERT INTO visits SELECT n, n * 37, '2024-12-01' FROM generate_series(1501, 3000) AS n; "
        "ANALYZE owners; ANALYZE pets; ANALYZE visits",
    )
    before = owner_scans(source.url)

    report = run(
        source, target, {"tables": {f"public.{t}": {"key": "preserve"} for t in ("owners", "pets", "visits")}}
    )

    assert report.exit_code == 0, report.to_json()
    owners = next(t for t in report.tables if t.table == "public.owners")
    assert (owners.read, owners.parents, owners.inserted) == (3000, 3000, 3000)
    assert fetch(target.url, "SELECT count(*), sum(id) FROM owners") == [(3000, 37 * 3000 * 3001 // 2)]
    index, seq = (after - was for after, was in zip(owner_scans(source.url), before, strict=True))
    # The closure pass then reads its 3,000 listed owners by key = ANY(…): before PostgreSQL 17 the index
    # scan of an array counts once per element; since, once.
    ((version,),) = fetch(source.url, "SELECT current_setting('server_version_num')::int")
    listed_reads = 3000 if version < 170000 else 0
    assert index - listed_reads < 100 and seq >= 1, (index, seq)
