"""The plan: parents before children, drift in plain words, and every way of losing data refused up front."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import psycopg
import pytest

from devkit import testbed
from sync.catalog import Catalog, read_catalog
from sync.connect import Endpoint, Side, connect
from sync.errors import PlanError
from sync.mapping import Mapping, load_mapping, parse_mapping
from sync.plan import ParentLink, Plan, build_plan, check_casts, draft_plan

PROJECT = Path(__file__).resolve().parent.parent


def run_sql(db: testbed.Database, script: str) -> None:
    with psycopg.connect(db.url, autocommit=True) as conn:
        conn.execute(script)  # type: ignore[arg-type]


async def catalog_of(db: testbed.Database, schemas: tuple[str, ...] = ("public",)) -> Catalog:
    conn = await connect(Endpoint.parse(Side.SOURCE, db.url))
    try:
        return await read_catalog(conn, schemas)
    finally:
        await conn.close()


def mapping(text: str = "") -> Mapping:
    return parse_mapping(text, Path("test.toml"))


@pytest.fixture
def schemas(make_db):
    """Build a source and a target from two scripts; returns their catalogs and the databases."""

    async def build(source_sql: str, target_sql: str | None = None):
        source, target = make_db(), make_db()
        run_sql(source, source_sql)
        run_sql(target, source_sql if target_sql is None else target_sql)
        return await catalog_of(source), await catalog_of(target), source, target

    return build


def problems_of(source: Catalog, target: Catalog, rules: Mapping) -> list[str]:
    with pytest.raises(PlanError) as caught:
        build_plan(source, target, rules)
    return caught.value.problems


def order(plan: Plan) -> list[str]:
    return [t.name for t in plan.tables]


# ---------------------------------------------------------------------------------------------- the seed


async def test_the_seed_plan_copies_parents_first_and_follows_the_rename(seed_dbs):
    source, target = [await catalog_of(db) for db in seed_dbs]
    plan = build_plan(source, target, load_mapping(PROJECT / "mappings" / "sync.toml"))

    names = order(plan)
    assert names[0] == "public.profiles"
    assert names.index("public.financing_requests") < names.index("public.documents")
    assert "public.notifications" not in names
    profiles, requests = plan.tables[0], plan.tables[names.index("public.financing_requests")]
    assert profiles.key == "preserve"
    assert ("full_name", "display_name") in [(c.source, c.target) for c in profiles.columns]
    assert profiles.target_only == {"onboarding_step": None, "avatar_url": None}
    assert profiles.parents == [ParentLink(("id",), "auth.users", ("id",), nullable=False)]
    assert requests.key == "remap" and requests.match_on == ("created_at", "profile_id")
    assert requests.sequences == {"id": "public.financing_requests_id_seq"}
    assert requests.since == "updated_at" and requests.since_indexed
    assert [t.name for t in plan.auth_triggers] == ["on_auth_user_created"]

    assert "public.profiles: column full_name renamed to display_name" in plan.notes
    assert "public.notifications exists only in target: left alone" in plan.notes
    assert "public.profiles: new column onboarding_step: inserted rows get its default 0" in plan.notes
    assert "enum public.request_status gained 'under_review' in target" in plan.notes
    assert any("financing_requests_term_months_check" in note for note in plan.notes)
    assert any(w.startswith("public.profiles: since-column updated_at has no index") for w in plan.warnings)


async def test_without_a_mapping_the_defaults_pick_keys_and_stop_at_the_renamed_column(seed_dbs):
    source, target = [await catalog_of(db) for db in seed_dbs]

    problems = problems_of(source, target, mapping())

    assert problems == [
        'public.profiles.full_name exists only in source: add ignore = ["full_name"] or '
        'rename = { full_name = "..." } under [tables."public.profiles"] '
        "(new target columns of type text: display_name, avatar_url)"
    ]
    plan = build_plan(source, target, mapping('[tables."public.profiles"]\nignore = ["full_name"]\n'))
    by_name = {t.name: t for t in plan.tables}
    assert by_name["public.profiles"].key == "preserve"
    # Integer keys are remapped; two rows are the same row when created_at and the owner agree.
    for name in ("public.financing_requests", "public.bank_profiles"):
        assert by_name[name].key == "remap"
        assert by_name[name].match_on == ("created_at", "profile_id")
        assert by_name[name].policy == "source-wins"
    # documents point at a request and at a profile: only the profile is an owner.
    assert by_name["public.documents"].match_on == ("created_at", "profile_id")


# ---------------------------------------------------------------------------------------------- cycles

CYCLE = """
CREATE TABLE public.teams (id uuid PRIMARY KEY, name text);
CREATE TABLE public.people (id uuid PRIMARY KEY, team_id uuid {people_null} REFERENCES public.teams (id));
ALTER TABLE public.teams ADD COLUMN captain_id uuid {teams_null} REFERENCES public.people (id);
"""


async def test_a_cycle_with_a_nullable_link_is_broken_on_that_link(schemas):
    script = CYCLE.format(people_null="NOT NULL", teams_null="NULL")
    source, target, *_ = await schemas(script)

    plan = build_plan(source, target, mapping())

    assert order(plan) == ["public.teams", "public.people"]
    teams, people = plan.tables
    assert teams.deferred == [ParentLink(("captain_id",), "public.people", ("id",), nullable=True)]
    assert people.deferred == []
    assert any(
        "public.teams: foreign key (captain_id) → public.people closes a cycle" in n for n in plan.notes
    )


async def test_a_cycle_without_a_nullable_link_is_refused_by_name(schemas):
    script = CYCLE.format(people_null="NOT NULL", teams_null="NOT NULL")
    source, target, *_ = await schemas(script)

    problems = problems_of(source, target, mapping())

    assert len(problems) == 1
    assert "foreign-key cycle public.people → public.teams → public.people cannot be broken" in problems[0]
    assert "public.people.team_id" in problems[0] and "public.teams.captain_id" in problems[0]


async def test_a_drafted_plan_lists_tables_an_unbroken_cycle_holds_back_last_in_name_order(schemas):
    script = (
        CYCLE.format(people_null="NOT NULL", teams_null="NOT NULL")
        + """
    CREATE TABLE public.zeta (id uuid PRIMARY KEY);
    CREATE TABLE public.alpha (id uuid PRIMARY KEY, zeta_id uuid REFERENCES public.zeta (id));
    CREATE TABLE public.badges (id uuid PRIMARY KEY, person_id uuid REFERENCES public.people (id));
    """
    )
    source, target, *_ = await schemas(script)

    plan, problems = draft_plan(source, target, mapping())

    assert len(problems) == 1 and "foreign-key cycle" in problems[0]
    assert order(plan) == ["public.zeta", "public.alpha", "public.badges", "public.people", "public.teams"]


async def test_self_references_and_links_to_users_do_not_order_tables_but_are_recorded(schemas):
    source, target, *_ = await schemas(
        """
        CREATE TABLE public.comments (
            id uuid PRIMARY KEY,
            author uuid NOT NULL REFERENCES auth.users (id),
            reply_to uuid REFERENCES public.comments (id),
            created_at timestamptz NOT NULL DEFAULT now()
        );
        """
    )

    (comments,) = build_plan(source, target, mapping()).tables

    assert {link.parent for link in comments.parents} == {"auth.users", "public.comments"}
    assert comments.deferred == []


# ---------------------------------------------------------------------------------------------- data loss

ITEMS = """
CREATE TABLE public.items (
    id uuid PRIMARY KEY,
    title text NOT NULL,
    {extra},
    created_at timestamptz NOT NULL DEFAULT now()
);
"""


async def test_a_column_only_production_has_is_an_error_until_ignored_or_renamed(schemas):
    source, target, *_ = await schemas(
        ITEMS.format(extra="legacy_flag boolean"), ITEMS.format(extra="archived boolean")
    )

    problems = problems_of(source, target, mapping())
    assert problems == [
        'public.items.legacy_flag exists only in source: add ignore = ["legacy_flag"] or '
        'rename = { legacy_flag = "archived" } under [tables."public.items"]'
    ]

    ignored = build_plan(source, target, mapping('[tables."public.items"]\nignore = ["legacy_flag"]\n'))
    assert "legacy_flag" not in [c.source for c in ignored.tables[0].columns]
    assert "public.items: column legacy_flag is not copied (ignore)" in ignored.notes

    renamed = build_plan(
        source, target, mapping('[tables."public.items"]\nrename = { legacy_flag = "archived" }\n')
    )
    assert ("legacy_flag", "archived") in [(c.source, c.target) for c in renamed.tables[0].columns]


async def test_a_not_null_column_without_default_needs_a_mapping_value(schemas):
    source, target, *_ = await schemas(
        ITEMS.format(extra="note text"), ITEMS.format(extra="note text, tenant text NOT NULL")
    )

    problems = problems_of(source, target, mapping())
    assert problems == [
        "public.items.tenant is NOT NULL in target with no default and no source column: "
        'add defaults = { tenant = "<SQL expression>" } under [tables."public.items"]'
    ]

    plan = build_plan(
        source, target, mapping('[tables."public.items"]\ndefaults = { tenant = "\'acme\'" }\n')
    )
    assert plan.tables[0].target_only == {"tenant": "'acme'"}
    assert "public.items: new column tenant: inserted rows get the mapping's 'acme'" in plan.notes


async def test_two_source_columns_cannot_land_in_one_target_column(schemas):
    source, target, *_ = await schemas(
        ITEMS.format(extra="label text, name text"), ITEMS.format(extra="name text")
    )

    problems = problems_of(source, target, mapping('[tables."public.items"]\nrename = { label = "name" }\n'))

    assert problems == [
        "public.items.name would receive both label and name from source: "
        'ignore or rename one of them under [tables."public.items"]'
    ]


async def test_identity_and_generated_target_columns_need_no_value(schemas):
    source, target, *_ = await schemas(
        ITEMS.format(extra="note text"),
        ITEMS.format(
            extra="note text, seq bigint GENERATED ALWAYS AS IDENTITY, "
            "title_length int GENERATED ALWAYS AS (length(title)) STORED"
        ),
    )

    (items,) = build_plan(source, target, mapping()).tables

    assert set(items.target_only) == {"seq", "title_length"}
    assert items.sequences == {"seq": "public.items_seq_seq"}


async def test_every_problem_is_reported_at_once(schemas):
    source, target, *_ = await schemas(
        ITEMS.format(extra="legacy_flag boolean") + "CREATE TABLE public.audit_log (id uuid PRIMARY KEY);",
        ITEMS.format(extra="tenant text NOT NULL") + "CREATE TABLE public.bare (note text);",
    )
    rules = mapping(
        '[tables."public.items"]\nignore = ["nope"]\nsince = "missing"\n[tables."public.ghost"]\n'
    )

    problems = problems_of(source, target, rules)

    expected = [
        'test.toml: [tables."public.ghost"] names a table that neither database has',
        "public.audit_log exists only in source",
        "public.items.nope is in ignore but not in the source table",
        "public.items.legacy_flag exists only in source",
        "public.items.tenant is NOT NULL in target",
        "public.items.missing is the since-column but not in the source table",
    ]
    for start in expected:
        assert any(p.startswith(start) for p in problems), (start, problems)
    assert len(problems) == len(expected)


async def test_a_table_without_primary_key_needs_a_unique_natural_key(schemas):
    script = "CREATE TABLE public.settings (name text NOT NULL {unique}, value text);"
    source, target, *_ = await schemas(script.format(unique=""))

    assert problems_of(source, target, mapping()) == [
        'public.settings has no primary key in target and no natural key: add key = "natural" and '
        'natural = ["..."] (columns with a unique constraint) under [tables."public.settings"], '
        "or skip = true"
    ]
    natural = mapping('[tables."public.settings"]\nkey = "natural"\nnatural = ["name"]\n')
    assert "has no unique constraint or index in target" in problems_of(source, target, natural)[0]

    source, target, *_ = await schemas(script.format(unique="UNIQUE"))
    (settings,) = build_plan(source, target, natural).tables
    assert settings.key == "natural" and settings.natural == ("name",)


async def test_a_table_only_production_has_is_an_error_unless_excluded(schemas):
    source, target, *_ = await schemas("CREATE TABLE public.audit_log (id uuid PRIMARY KEY);", "SELECT 1")

    assert problems_of(source, target, mapping()) == [
        'public.audit_log exists only in source: add exclude = ["public.audit_log"] under [sync], '
        'or skip = true under [tables."public.audit_log"]'
    ]
    plan = build_plan(source, target, mapping('[sync]\nexclude = ["public.audit_log"]\n'))
    assert plan.tables == [] and "public.audit_log is excluded by the mapping: left alone" in plan.notes


async def test_composite_primary_keys_are_preserved_and_composite_links_recorded(schemas):
    source, target, *_ = await schemas(
        """
        CREATE TABLE public.memberships (
            org_id integer, user_id uuid REFERENCES auth.users (id), role text NOT NULL,
            PRIMARY KEY (org_id, user_id)
        );
        CREATE TABLE public.grants (
            id uuid PRIMARY KEY, org_id integer NOT NULL, user_id uuid NOT NULL, scope text,
            FOREIGN KEY (org_id, user_id) REFERENCES public.memberships (org_id, user_id)
        );
        """
    )

    memberships, grants = build_plan(source, target, mapping()).tables

    assert memberships.name == "public.memberships"
    assert memberships.key == "preserve" and memberships.primary_key == ("org_id", "user_id")
    assert memberships.since is None  # no updated_at/created_at: the whole table
    assert grants.parents == [
        ParentLink(("org_id", "user_id"), "public.memberships", ("org_id", "user_id"), nullable=False)
    ]


async def test_a_remapped_integer_key_without_anything_to_match_on_is_an_error(schemas):
    source, target, *_ = await schemas("CREATE TABLE public.tags (id serial PRIMARY KEY, label text);")

    assert "nothing tells two rows with the same key apart" in problems_of(source, target, mapping())[0]
    plan = build_plan(source, target, mapping('[tables."public.tags"]\nmatch_on = ["label"]\n'))
    assert plan.tables[0].key == "remap" and plan.tables[0].match_on == ("label",)


# ---------------------------------------------------------------------------------------------- casts


async def test_casts_are_checked_even_on_a_table_with_other_problems(schemas):
    source, target, _, target_db = await schemas(
        ITEMS.format(extra="payload jsonb, legacy text"), ITEMS.format(extra="payload integer")
    )
    plan, problems = draft_plan(source, target, mapping())
    assert [p.split(":")[0] for p in problems] == ["public.items.legacy exists only in source"]

    conn = await connect(Endpoint.parse(Side.TARGET, target_db.url))
    try:
        assert [p.split(":")[0] for p in await check_casts(conn, plan.tables)] == ["public.items.payload"]
    finally:
        await conn.close()


async def test_an_impossible_cast_is_found_by_asking_the_target(schemas):
    source, target, _, target_db = await schemas(
        ITEMS.format(extra="payload jsonb, amount integer"),
        ITEMS.format(extra="payload integer, amount bigint"),
    )
    plan = build_plan(source, target, mapping())
    casts = {c.target: c.cast for c in plan.tables[0].columns if c.cast}
    assert casts == {"payload": "integer", "amount": "bigint"}

    conn = await connect(Endpoint.parse(Side.TARGET, target_db.url))
    try:
        problems = await check_casts(conn, plan.tables)
        assert not conn.is_in_transaction()
    finally:
        await conn.close()

    assert len(problems) == 1  # integer → bigint is fine
    assert problems[0].startswith(
        "public.items.payload: jsonb in source cannot be stored as integer in target"
    )
    assert problems[0].endswith(
        'add ignore = ["payload"] under [tables."public.items"], or change the column type'
    )


async def test_a_type_the_target_does_not_have_is_an_impossible_cast(schemas):
    source, target, _, target_db = await schemas(
        "CREATE TYPE public.mood AS ENUM ('ok'); " + ITEMS.format(extra="mood public.mood"),
        ITEMS.format(extra="mood text"),
    )
    plan = build_plan(source, target, mapping())

    conn = await connect(Endpoint.parse(Side.TARGET, target_db.url))
    try:
        problems = await check_casts(conn, plan.tables)
    finally:
        await conn.close()

    assert problems == [
        "public.items.mood: the source type public.mood does not exist in target: "
        'add ignore = ["mood"] under [tables."public.items"], or change the column type'
    ]


# ---------------------------------------------------------------------------------------------- names


ODD = """
CREATE SCHEMA "Sales Dept";
CREATE TABLE public."Odd Table" (
    "Quote""d" integer PRIMARY KEY,
    "Created At" timestamptz NOT NULL DEFAULT now(),
    {extra}
);
CREATE TABLE "Sales Dept"."Line Items" (
    id uuid PRIMARY KEY,
    "Odd Ref" integer REFERENCES public."Odd Table" ("Quote""d")
);
"""


async def test_odd_identifiers_are_planned_and_cast_checked_with_their_exact_names(schemas):
    source, target, source_db, target_db = await schemas(
        ODD.format(extra='"Old ""Name""" text, "Count" integer'),
        ODD.format(extra='"New Name" text, "Count" bigint'),
    )
    odd = '[tables."public.Odd Table"]\nmatch_on = ["Created At"]\n'

    problems = problems_of(source, target, mapping(odd))
    assert problems == [
        'public.Odd Table.Old "Name" exists only in source: add ignore = ["Old \\"Name\\""] or '
        'rename = { "Old \\"Name\\"" = "New Name" } under [tables."public.Odd Table"]'
    ]

    fixed = mapping(odd + 'rename = { "Old \\"Name\\"" = "New Name" }\n')
    plan = build_plan(source, target, fixed)
    (table,) = plan.tables  # the other schema is not synced
    assert table.name == "public.Odd Table" and table.primary_key == ('Quote"d',)
    assert table.key == "remap"
    assert [(c.source, c.target) for c in table.columns][2] == ('Old "Name"', "New Name")

    conn = await connect(Endpoint.parse(Side.TARGET, target_db.url))
    try:
        assert await check_casts(conn, plan.tables) == []
    finally:
        await conn.close()

    both = mapping(
        '[sync]\nschemas = ["public", "Sales Dept"]\n' + odd + 'rename = { "Old \\"Name\\"" = "New Name" }\n'
    )
    source, target = [await catalog_of(db, ("public", "Sales Dept")) for db in (source_db, target_db)]
    assert order(build_plan(source, target, both)) == ["public.Odd Table", "Sales Dept.Line Items"]


# ---------------------------------------------------------------------------------------------- warnings


async def test_a_trigger_that_calls_out_is_a_warning_until_skipped(schemas):
    hook = """
    CREATE FUNCTION public.notify_crm() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM net.http_post(url := 'https://crm.example.com/hook', body := to_jsonb(new));
        RETURN new;
    END $$;
    CREATE TRIGGER crm_hook AFTER INSERT ON public.items FOR EACH ROW EXECUTE FUNCTION public.notify_crm();
    """
    source, target, *_ = await schemas(
        ITEMS.format(extra="note text"), ITEMS.format(extra="note text") + hook
    )

    plan = build_plan(source, target, mapping())
    (items,) = plan.tables
    assert [(t.name, t.reaches_outside, t.timing) for t in items.triggers] == [
        ("crm_hook", True, "AFTER INSERT")
    ]
    assert any("trigger crm_hook (public.notify_crm) calls out of the database" in w for w in plan.warnings)

    quiet = build_plan(source, target, mapping('[tables."public.items"]\ntriggers = "skip"\n'))
    assert quiet.tables[0].trigger_mode == "skip"
    assert not any("crm_hook" in w for w in quiet.warnings)


async def test_a_reader_without_bypassrls_is_warned_that_policies_hide_rows(seed_dbs):
    source, target = [await catalog_of(db) for db in seed_dbs]
    restricted = dataclasses.replace(source, bypass_rls=False)

    plan = build_plan(restricted, target, load_mapping(PROJECT / "mappings" / "sync.toml"))

    assert any(
        w.startswith("the source login does not bypass row level security") and "public.profiles" in w
        for w in plan.warnings
    )
    assert not any(w.startswith("the target login") for w in plan.warnings)
