"""The catalog: what each database holds, read as the hosted project's non-superuser `postgres` login."""

from __future__ import annotations

import psycopg

from sync.catalog import ForeignKey, read_catalog
from sync.connect import Endpoint, PoolMode, Side, connect


async def read(url: str, schemas: tuple[str, ...] = ("public",), mode: PoolMode | None = None):
    conn = await connect(Endpoint.parse(Side.SOURCE, url, mode))
    try:
        return await read_catalog(conn, schemas)
    finally:
        await conn.close()


async def test_production_catalog_knows_keys_links_sequences_and_indexes(seed_dbs):
    source, _ = seed_dbs

    catalog = await read(source.url)

    assert set(catalog.tables) == {
        "auth.users",
        "auth.identities",
        "public.profiles",
        "public.financing_requests",
        "public.bank_profiles",
        "public.documents",
    }
    assert catalog.server_version >= 150000 and catalog.bypass_rls
    requests = catalog.tables["public.financing_requests"]
    assert list(requests.columns)[:5] == ["id", "profile_id", "amount", "term_months", "status"]
    assert requests.primary_key == ("id",)
    assert requests.columns["id"].identity == "d"
    assert requests.columns["amount"].type == "numeric(12,2)"
    assert requests.columns["status"].type == "public.request_status"
    assert requests.columns["status"].type_kind == "e"
    assert requests.columns["status"].default == "'draft'::public.request_status"
    assert requests.sequences == {"id": "public.financing_requests_id_seq"}
    assert {"profile_id", "updated_at"} <= requests.indexed
    assert requests.row_security
    assert catalog.enums == {"public.request_status": ("draft", "submitted", "approved", "rejected")}

    documents = catalog.tables["public.documents"]
    assert (
        ForeignKey(
            "documents_request_id_fkey", ("request_id",), "public.financing_requests", ("id",), "no action"
        )
        in documents.foreign_keys
    )
    assert documents.columns["request_id"].nullable
    profiles = catalog.tables["public.profiles"]
    assert profiles.foreign_keys == [
        ForeignKey("profiles_id_fkey", ("id",), "auth.users", ("id",), "cascade")
    ]
    assert "updated_at" not in profiles.indexed
    bank = catalog.tables["public.bank_profiles"]
    assert bank.sequences == {"id": "public.bank_profiles_id_seq"}  # bigserial
    assert bank.columns["id"].default == "nextval('public.bank_profiles_id_seq'::regclass)"
    # The auth tables the tool handles are read too, with the signup trigger.
    (signup,) = catalog.tables["auth.users"].triggers
    assert (signup.name, signup.function, signup.timing) == (
        "on_auth_user_created",
        "public.handle_new_user",
        "AFTER INSERT",
    )
    assert signup.enabled and signup.for_each_row and not signup.reaches_outside
    assert catalog.tables["auth.identities"].columns["email"].generated


async def test_development_catalog_shows_the_months_schema_work(seed_dbs):
    _, target = seed_dbs

    catalog = await read(target.url)

    profiles = catalog.tables["public.profiles"]
    assert "full_name" not in profiles.columns and "display_name" in profiles.columns
    onboarding = profiles.columns["onboarding_step"]
    assert (onboarding.nullable, onboarding.default) == (False, "0")
    assert profiles.columns["avatar_url"].nullable
    assert "public.notifications" in catalog.tables
    assert catalog.tables["public.financing_requests"].checks == {
        "financing_requests_term_months_check": "CHECK (((term_months >= 3) AND (term_months <= 60)))"
    }
    assert "under_review" in catalog.enums["public.request_status"]


async def test_odd_names_unique_indexes_and_outside_calls_are_read_exactly(make_db):
    db = make_db()
    with psycopg.connect(db.url, autocommit=True) as conn:
        conn.execute(
            """
            CREATE TABLE public."Odd Table" (
                "Quote""d" integer PRIMARY KEY,
                "Mixed Case" text UNIQUE,
                "with space" timestamptz,
                code text,
                deleted boolean NOT NULL DEFAULT false,
                seq bigint GENERATED ALWAYS AS IDENTITY,
                upper_code text GENERATED ALWAYS AS (upper(code)) STORED
            );
            CREATE INDEX ON public."Odd Table" ("with space");
            CREATE UNIQUE INDEX ON public."Odd Table" (code) WHERE NOT deleted;
            CREATE UNIQUE INDEX ON public."Odd Table" (lower("Mixed Case"));
            CREATE TABLE public.child (
                id uuid PRIMARY KEY,
                odd integer REFERENCES public."Odd Table" ("Quote""d") ON DELETE SET NULL
            );
            CREATE FUNCTION public."Tell CRM"() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                PERFORM net.http_post(url := 'https://crm.example.com', body := to_jsonb(new));
                RETURN new;
            END $$;
            CREATE TRIGGER "CRM hook" AFTER INSERT OR UPDATE ON public."Odd Table"
                FOR EACH ROW EXECUTE FUNCTION public."Tell CRM"();
            ALTER TABLE public."Odd Table" ENABLE ALWAYS TRIGGER "CRM hook";
            """
        )

    catalog = await read(db.url)

    odd = catalog.tables["public.Odd Table"]
    assert (odd.schema, odd.table) == ("public", "Odd Table")
    assert odd.primary_key == ('Quote"d',)
    assert odd.unique == [("Mixed Case",)]  # the expression index is not a key
    assert odd.partial_unique == [("code",)]
    assert "with space" in odd.indexed
    assert odd.columns["seq"].identity == "a"
    assert odd.columns["upper_code"].generated and odd.columns["upper_code"].default is None
    assert odd.sequences == {"seq": 'public."Odd Table_seq_seq"'}
    (hook,) = odd.triggers
    assert (hook.name, hook.function, hook.timing) == (
        "CRM hook",
        "public.Tell CRM",
        "AFTER INSERT OR UPDATE",
    )
    assert hook.reaches_outside and hook.fires_on_replica
    assert catalog.tables["public.child"].foreign_keys == [
        ForeignKey("child_odd_fkey", ("odd",), "public.Odd Table", ('Quote"d',), "set null")
    ]


async def test_a_transaction_mode_connection_reads_the_catalog_without_prepared_statements(seed_dbs):
    source, _ = seed_dbs
    endpoint = Endpoint.parse(Side.SOURCE, source.url, PoolMode.TRANSACTION)

    conn = await connect(endpoint)
    try:
        catalog = await read_catalog(conn, ["public"])
        # A transaction pooler hands each transaction to any backend: nothing may be left prepared.
        prepared = await conn.fetchval("SELECT count(*) FROM pg_prepared_statements")
    finally:
        await conn.close()

    assert prepared == 0
    assert catalog == await read(source.url)
    direct = await connect(Endpoint.parse(Side.SOURCE, source.url))
    try:
        await read_catalog(direct, ["public"])
        assert await direct.fetchval("SELECT count(*) FROM pg_prepared_statements") > 0
    finally:
        await direct.close()


async def test_reading_inside_a_callers_transaction_leaves_it_as_it_was(seed_dbs):
    source, _ = seed_dbs
    conn = await connect(Endpoint.parse(Side.SOURCE, source.url))
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            before = await conn.fetchval("SHOW search_path")
            await read_catalog(conn, ["public"])
            assert await conn.fetchval("SHOW search_path") == before
            assert conn.is_in_transaction()
        assert not conn.is_in_transaction()
    finally:
        await conn.close()
