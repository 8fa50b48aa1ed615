"""Row identity across both sides: natural keys, and remapped keys kept out of production's way."""

from __future__ import annotations

import asyncio

from queries import execute, fetch
from test_copy import run, seed_parent_child

from sync.connect import Endpoint, Side
from sync.mapping import Mapping
from sync.plan.load import load_plan


def as_mapping(rules: dict) -> Mapping:
    return Mapping.model_validate(rules)


TAGS = """
CREATE TABLE tags (id integer PRIMARY KEY, name text NOT NULL UNIQUE, color text,
                   updated_at timestamptz NOT NULL);
CREATE TABLE labels (id uuid PRIMARY KEY, tag_id integer NOT NULL REFERENCES tags (id),
                     updated_at timestamptz NOT NULL);
"""
NATURAL_TAGS = {"tables": {"public.tags": {"key": "natural", "natural": ["name"]}}}


def test_a_natural_key_row_whose_key_another_target_row_holds_gets_a_new_key_never_overwriting(make_db):
    source, target = make_db(), make_db()
    for db in (source, target):
        execute(db.url, TAGS)
    # Development made its own tag 1 ("green"); production's tag 1 is "red", and "blue" is 7 in target.
    execute(
        target.url, "INSERT INTO tags VALUES (1, 'green', 'g', '2024-11-25'), (7, 'blue', 'b', '2024-01-01')"
    )
    execute(
        source.url,
        """
        INSERT INTO tags VALUES (1, 'red', 'r', '2024-12-01'), (2, 'blue', 'B', '2024-12-01');
        INSERT INTO labels VALUES ('30000000-0000-0000-0000-000000000001', 1, '2024-12-01'),
                                  ('30000000-0000-0000-0000-000000000002', 2, '2024-12-01');
    """,
    )
    mapping = {"sync": {"key_margin": 100}, **NATURAL_TAGS}

    report = run(source, target, mapping)

    assert report.exit_code == 0, report.to_json()
    rows = dict(fetch(target.url, "SELECT name, id FROM tags"))
    assert rows["green"] == 1 and rows["blue"] == 7  # development's row intact, blue kept its key
    assert rows["red"] > 2 + 100  # past production's highest key plus the margin
    assert fetch(target.url, "SELECT color FROM tags WHERE name IN ('green', 'blue') ORDER BY name") == [
        ("B",),
        ("g",),
    ]
    assert fetch(target.url, "SELECT t.name FROM labels l JOIN tags t ON t.id = l.tag_id ORDER BY l.id") == [
        ("red",),
        ("blue",),
    ]
    # A second run recognises every row by its natural key: nothing written, nothing new.
    again = run(source, target, mapping)
    assert sum(t.written for t in again.tables) == 0
    assert fetch(target.url, "SELECT count(*) FROM tags") == [(3,)]
    # A catch-up: development took key 3 for "purple", production for "yellow".
    execute(target.url, "INSERT INTO tags VALUES (3, 'purple', 'p', now())")
    execute(source.url, "INSERT INTO tags VALUES (3, 'yellow', 'y', now())")
    catch_up = run(source, target, mapping, since=None)
    assert catch_up.exit_code == 0, catch_up.to_json()
    rows = dict(fetch(target.url, "SELECT name, id FROM tags"))
    assert rows["purple"] == 3 and rows["yellow"] > 3 + 100
    assert len(rows) == 5


SETTINGS = """
CREATE TABLE settings (scope text NOT NULL, name text NOT NULL, value text, updated_at timestamptz NOT NULL,
                       UNIQUE (scope, name));
"""
NATURAL_SETTINGS = {"tables": {"public.settings": {"key": "natural", "natural": ["scope", "name"]}}}


def test_a_table_without_primary_key_is_copied_by_its_natural_key_in_batches_and_catch_ups(make_db):
    source, target = make_db(), make_db()
    for db in (source, target):
        execute(db.url, SETTINGS)
    execute(target.url, "INSERT INTO settings VALUES ('app', 'theme', 'dark', '2024-11-25')")
    execute(
        source.url,
        """
        INSERT INTO settings SELECT 'user' || (g % 3), 'key ' || g, 'v' || g, '2024-12-01'
            FROM generate_series(1, 25) g;
        INSERT INTO settings VALUES ('app', 'theme', 'light', '2024-12-01');
    """,
    )

    report = run(source, target, NATURAL_SETTINGS, batch_size=4)

    assert report.exit_code == 0, report.to_json()
    everything = "SELECT scope, name, value FROM settings ORDER BY scope, name"
    assert fetch(target.url, everything) == fetch(source.url, everything)
    # A catch-up: one edit and one new setting, nothing duplicated.
    execute(
        source.url,
        """
        UPDATE settings SET value = 'edited', updated_at = now() WHERE name = 'key 7';
        INSERT INTO settings VALUES ('app', 'locale', 'es', now());
    """,
    )
    catch_up = run(source, target, NATURAL_SETTINGS, since=None)
    assert catch_up.exit_code == 0, catch_up.to_json()
    (settings,) = catch_up.tables
    assert (settings.inserted, settings.updated) == (1, 1)
    assert fetch(target.url, everything) == fetch(source.url, everything)


def test_natural_key_columns_that_accept_null_are_refused_by_the_plan(make_db):
    from sync.errors import PlanError

    source, target = make_db(), make_db()
    for db in (source, target):
        execute(db.url, "CREATE TABLE settings (name text UNIQUE, value text, updated_at timestamptz)")
    try:
        run(source, target, {"tables": {"public.settings": {"key": "natural", "natural": ["name"]}}})
    except PlanError as exc:
        problems = exc.problems
    else:
        raise AssertionError("the plan accepted a natural key that accepts NULL")
    assert problems == [
        "public.settings.name is in natural but accepts NULL in source and target, so a row with NULL "
        'there cannot be matched: make it NOT NULL or choose other columns under [tables."public.settings"]'
    ]
    assert fetch(target.url, "SELECT to_regnamespace('_sync') IS NULL") == [(True,)]


REMAP = {
    "sync": {"key_margin": 1000},
    "tables": {
        "public.requests": {"key": "remap", "match_on": ["created_at", "owner_id"]},
        "public.docs": {"key": "remap", "match_on": ["created_at", "path"]},
    },
}


def test_remapped_keys_stay_out_of_the_way_of_the_keys_production_issues_next(make_db):
    source, target = make_db(), make_db()
    seed_parent_child(source, target)  # development's 3 test requests took production's ids 11..13
    plan = asyncio.run(
        load_plan(
            Endpoint.parse(Side.SOURCE, source.url),
            Endpoint.parse(Side.TARGET, target.url),
            as_mapping(REMAP),
        )
    )
    assert (
        "public.requests: a row whose key id is taken by another target row gets a new key past "
        "production's highest plus 1,000 (key_margin under [sync])" in " ".join(plan.notes)
    )
    first = run(source, target, REMAP)
    assert {t.table: t.remapped for t in first.tables}["public.requests"] == 3
    # Production's requests 11..13 moved past production's highest key (30) plus the margin.
    moved = "SELECT count(*) FROM requests WHERE id > 30 + 1000 AND created_at > '2024-12-01'"
    assert fetch(target.url, moved) == [(3,)]
    new_requests = """
        INSERT INTO requests (owner_id, amount, created_at, updated_at)
            SELECT '00000000-0000-0000-0000-000000000003', 1000 + g, now(), now()
            FROM generate_series(1, 5) g;
    """
    for _ in range(2):
        # Production keeps issuing keys from its own sequence (31.., then 36..) between catch-ups.
        execute(source.url, new_requests)
        catch_up = run(source, target, REMAP, since=None)
        assert catch_up.exit_code == 0, catch_up.to_json()
        assert {t.table: t.remapped for t in catch_up.tables}["public.requests"] == 0
    # Every production request is on the target once, the new ones under their own keys.
    production = "SELECT owner_id, amount, created_at FROM requests"
    assert sorted(fetch(source.url, production)) == sorted(
        fetch(target.url, f"{production} WHERE created_at <> '2024-11-25'")
    )
    newest = "SELECT id, amount FROM requests WHERE amount > 1000 ORDER BY id"
    assert fetch(target.url, newest) == fetch(source.url, newest)
    # Development's rows are intact; only the first run's 3 collisions were ever remapped.
    assert fetch(target.url, "SELECT id FROM requests WHERE created_at = '2024-11-25' ORDER BY id") == [
        (11,),
        (12,),
        (13,),
    ]
    assert fetch(target.url, "SELECT count(*) FROM _sync.id_map WHERE table_name = 'public.requests'") == [
        (3,)
    ]
