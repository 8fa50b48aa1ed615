"""The Supabase-shaped test database has the auth schema a hosted project has.

The engine is tested against ``devkit/sql/supabase/``; these tests pin that fixture to the reference
(``supabase-auth.md`` §1.1 and §1.2 for ``auth.users`` and ``auth.identities``,
``supabase-platform.md`` §1 for what the ``postgres`` login may do), so that a drift in the fixture
fails here with a readable diff instead of silently making the engine's tests easier than reality.
"""

from __future__ import annotations

import difflib
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import psycopg
import pytest
from psycopg import errors, sql
from psycopg.types.json import Jsonb

from devkit import testbed


class Column(NamedTuple):
    name: str
    type: str
    not_null: bool = False
    default: str | None = None
    generated: str | None = None  # the expression of a GENERATED ALWAYS AS (…) STORED column
    identity: str = ""  # attidentity: "" (none), "a" (ALWAYS) or "d" (BY DEFAULT)

    def line(self) -> str:
        parts = [self.name, self.type, "NOT NULL" if self.not_null else "null"]
        if self.default is not None:
            parts.append(f"DEFAULT {self.default}")
        if self.generated is not None:
            parts.append(f"GENERATED ALWAYS AS ({self.generated}) STORED")
        if self.identity:
            parts.append(f"IDENTITY {self.identity}")
        return " | ".join(parts)


# The tables of the reference, transcribed in PostgreSQL's own spelling: the types as format_type()
# prints them (varchar(255) → character varying(255), timestamptz → timestamp with time zone) and
# defaults and generated expressions as pg_get_expr() prints them. Where the reference writes `''`
# for a default, the catalog holds `''::character varying`: those columns were varchar when the
# migrations gave them their default (phone's `NULL::character varying` shows the same history).

VARCHAR = "character varying(255)"
TSTZ = "timestamp with time zone"
EMPTY = "''::character varying"

# supabase-auth.md §1.1, auth.users (35 columns). Six of the ten string columns GoTrue reads into Go
# strings have no default (aud, role, confirmation_token, recovery_token, email_change_token_new,
# email_change); the other four default to ''.
USERS_COLUMNS = [
    Column("instance_id", "uuid"),
    Column("id", "uuid", not_null=True),
    Column("aud", VARCHAR),
    Column("role", VARCHAR),
    Column("email", VARCHAR),
    Column("encrypted_password", VARCHAR),
    Column("email_confirmed_at", TSTZ),
    Column("invited_at", TSTZ),
    Column("confirmation_token", VARCHAR),
    Column("confirmation_sent_at", TSTZ),
    Column("recovery_token", VARCHAR),
    Column("recovery_sent_at", TSTZ),
    Column("email_change_token_new", VARCHAR),
    Column("email_change", VARCHAR),
    Column("email_change_sent_at", TSTZ),
    Column("last_sign_in_at", TSTZ),
    Column("raw_app_meta_data", "jsonb"),
    Column("raw_user_meta_data", "jsonb"),
    Column("is_super_admin", "boolean"),
    Column("created_at", TSTZ),
    Column("updated_at", TSTZ),
    Column("phone", "text", default="NULL::character varying"),
    Column("phone_confirmed_at", TSTZ),
    Column("phone_change", "text", default=EMPTY),
    Column("phone_change_token", VARCHAR, default=EMPTY),
    Column("phone_change_sent_at", TSTZ),
    Column("confirmed_at", TSTZ, generated="LEAST(email_confirmed_at, phone_confirmed_at)"),
    Column("email_change_token_current", VARCHAR, default=EMPTY),
    Column("email_change_confirm_status", "smallint", default="0"),
    Column("banned_until", TSTZ),
    Column("reauthentication_token", VARCHAR, default=EMPTY),
    Column("reauthentication_sent_at", TSTZ),
    Column("is_sso_user", "boolean", not_null=True, default="false"),
    Column("deleted_at", TSTZ),
    Column("is_anonymous", "boolean", not_null=True, default="false"),
]

# supabase-auth.md §1.2, auth.identities (9 columns).
IDENTITIES_COLUMNS = [
    Column("provider_id", "text", not_null=True),
    Column("user_id", "uuid", not_null=True),
    Column("identity_data", "jsonb", not_null=True),
    Column("provider", "text", not_null=True),
    Column("last_sign_in_at", TSTZ),
    Column("created_at", TSTZ),
    Column("updated_at", TSTZ),
    Column("email", "text", generated="lower((identity_data ->> 'email'::text))"),
    Column("id", "uuid", not_null=True, default="gen_random_uuid()"),
]

# supabase-auth.md §1.1 "Constraints and indexes" (primary key, unique constraint, CHECK).
USERS_CONSTRAINTS = {
    "users_pkey": "PRIMARY KEY (id)",
    "users_phone_key": "UNIQUE (phone)",
    "users_email_change_confirm_status_check": (
        "CHECK (((email_change_confirm_status >= 0) AND (email_change_confirm_status <= 2)))"
    ),
}

# supabase-auth.md §1.2.
IDENTITIES_CONSTRAINTS = {
    "identities_pkey": "PRIMARY KEY (id)",
    "identities_provider_id_provider_unique": "UNIQUE (provider_id, provider)",
    "identities_user_id_fkey": "FOREIGN KEY (user_id) REFERENCES auth.users(id) ON DELETE CASCADE",
}


def _token_index(column: str) -> str:
    return (
        f"CREATE UNIQUE INDEX {column}_idx ON auth.users USING btree ({column}) "
        f"WHERE (({column})::text !~ '^[0-9 ]*$'::text)"
    )


# supabase-auth.md §1.1: every index on auth.users, those behind constraints included.
USERS_INDEXES = {
    "users_pkey": "CREATE UNIQUE INDEX users_pkey ON auth.users USING btree (id)",
    "users_phone_key": "CREATE UNIQUE INDEX users_phone_key ON auth.users USING btree (phone)",
    # On plain email (so case-sensitive), and only among non-SSO users.
    "users_email_partial_key": (
        "CREATE UNIQUE INDEX users_email_partial_key ON auth.users USING btree (email) "
        "WHERE (is_sso_user = false)"
    ),
    **{
        f"{column}_idx": _token_index(column)
        for column in (
            "confirmation_token",
            "recovery_token",
            "email_change_token_current",
            "email_change_token_new",
            "reauthentication_token",
        )
    },
    "users_instance_id_email_idx": (
        "CREATE INDEX users_instance_id_email_idx ON auth.users "
        "USING btree (instance_id, lower((email)::text))"
    ),
    "users_instance_id_idx": "CREATE INDEX users_instance_id_idx ON auth.users USING btree (instance_id)",
    "users_is_anonymous_idx": "CREATE INDEX users_is_anonymous_idx ON auth.users USING btree (is_anonymous)",
}

# supabase-auth.md §1.2.
IDENTITIES_INDEXES = {
    "identities_pkey": "CREATE UNIQUE INDEX identities_pkey ON auth.identities USING btree (id)",
    "identities_provider_id_provider_unique": (
        "CREATE UNIQUE INDEX identities_provider_id_provider_unique ON auth.identities "
        "USING btree (provider_id, provider)"
    ),
    "identities_email_idx": (
        "CREATE INDEX identities_email_idx ON auth.identities USING btree (email text_pattern_ops)"
    ),
    "identities_user_id_idx": "CREATE INDEX identities_user_id_idx ON auth.identities USING btree (user_id)",
}


# --------------------------------------------------------------------------------------------------
# Reading the catalog, writing rows
# --------------------------------------------------------------------------------------------------


@contextmanager
def connect(url: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection (each statement stands alone) with a search_path that qualifies."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET search_path = pg_catalog")
        yield conn


def scalar(conn: psycopg.Connection, query: str, *params: object) -> object:
    return conn.execute(query, params).fetchone()[0]  # type: ignore[arg-type, index]


def assert_same_lines(actual: list[str], expected: list[str], what: str) -> None:
    """Compare line by line; on a mismatch, fail with a unified diff, reference first."""
    diff = "\n".join(difflib.unified_diff(expected, actual, "reference", "fixture", lineterm=""))
    assert actual == expected, f"{what} differs from the reference:\n{diff}"


def columns_of(conn: psycopg.Connection, table: str) -> list[Column]:
    rows = conn.execute(
        """
        SELECT a.attname,
               format_type(a.atttypid, a.atttypmod),
               a.attnotnull,
               CASE WHEN a.attgenerated = '' THEN pg_get_expr(d.adbin, d.adrelid) END,
               CASE WHEN a.attgenerated = 's' THEN pg_get_expr(d.adbin, d.adrelid) END,
               a.attgenerated,
               a.attidentity
        FROM pg_attribute AS a
        LEFT JOIN pg_attrdef AS d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY a.attnum
        """,
        (table,),
    ).fetchall()
    # A generated column of any kind other than STORED (PG 18's VIRTUAL) would not be transcribed.
    assert all(kind in ("", "s") for *_, kind, _ in rows), f"{table} has a non-STORED generated column"
    return [
        Column(name, typ, nn, default, generated, ident)
        for name, typ, nn, default, generated, _, ident in rows
    ]


def constraints_of(conn: psycopg.Connection, table: str) -> dict[str, str]:
    # Only the kinds the reference lists; PG 18 also records NOT NULL as constraints (contype 'n'),
    # which the column comparison already covers.
    rows = conn.execute(
        """
        SELECT conname, pg_get_constraintdef(oid)
        FROM pg_constraint
        WHERE conrelid = %s::regclass AND contype IN ('p', 'u', 'c', 'f', 'x')
        """,
        (table,),
    ).fetchall()
    return dict(rows)


def indexes_of(conn: psycopg.Connection, table: str) -> dict[str, str]:
    rows = conn.execute(
        """
        SELECT c.relname, pg_get_indexdef(i.indexrelid)
        FROM pg_index AS i
        JOIN pg_class AS c ON c.oid = i.indexrelid
        WHERE i.indrelid = %s::regclass
        """,
        (table,),
    ).fetchall()
    return dict(rows)


def as_lines(definitions: dict[str, str]) -> list[str]:
    return [f"{name}: {definition}" for name, definition in sorted(definitions.items())]


def insert_user(conn: psycopg.Connection, **values: object) -> uuid.UUID:
    """Insert one auth.users row with exactly the given columns (plus a fresh id unless given)."""
    values.setdefault("id", uuid.uuid4())
    query = sql.SQL("INSERT INTO auth.users ({}) VALUES ({})").format(
        sql.SQL(", ").join(map(sql.Identifier, values)),
        sql.SQL(", ").join(sql.Placeholder() * len(values)),
    )
    conn.execute(query, list(values.values()))
    return values["id"]  # type: ignore[return-value]


def insert_identity(conn: psycopg.Connection, user_id: uuid.UUID, **values: object) -> None:
    """Insert one email identity of ``user_id`` as GoTrue writes it, with ``values`` on top."""
    row: dict[str, object] = {
        "provider_id": str(user_id),
        "user_id": user_id,
        "identity_data": Jsonb({"sub": str(user_id)}),
        "provider": "email",
        "created_at": "2024-01-01T00:00:00Z",
        "updated_at": "2024-01-01T00:00:00Z",
        **values,
    }
    query = sql.SQL("INSERT INTO auth.identities ({}) VALUES ({})").format(
        sql.SQL(", ").join(map(sql.Identifier, row)),
        sql.SQL(", ").join(sql.Placeholder() * len(row)),
    )
    conn.execute(query, list(row.values()))


# --------------------------------------------------------------------------------------------------
# Shape: columns, constraints, indexes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "expected"),
    [("auth.users", USERS_COLUMNS), ("auth.identities", IDENTITIES_COLUMNS)],
)
def test_columns_match_the_reference_one_by_one_in_order(supabase_db: testbed.Database, table, expected):
    with connect(supabase_db.url) as conn:
        actual = columns_of(conn, table)
    assert_same_lines(
        [f"{n:>2}. {c.line()}" for n, c in enumerate(actual, 1)],
        [f"{n:>2}. {c.line()}" for n, c in enumerate(expected, 1)],
        f"the columns of {table}",
    )


@pytest.mark.parametrize(
    ("table", "expected"),
    [("auth.users", USERS_CONSTRAINTS), ("auth.identities", IDENTITIES_CONSTRAINTS)],
)
def test_constraints_carry_the_reference_names_and_definitions(
    supabase_db: testbed.Database, table, expected
):
    with connect(supabase_db.url) as conn:
        actual = constraints_of(conn, table)
    assert_same_lines(as_lines(actual), as_lines(expected), f"the constraints of {table}")


@pytest.mark.parametrize(
    ("table", "expected"),
    [("auth.users", USERS_INDEXES), ("auth.identities", IDENTITIES_INDEXES)],
)
def test_indexes_carry_the_reference_names_and_definitions(supabase_db: testbed.Database, table, expected):
    with connect(supabase_db.url) as conn:
        actual = indexes_of(conn, table)
    assert_same_lines(as_lines(actual), as_lines(expected), f"the indexes of {table}")


def test_the_email_key_is_on_plain_email_and_skips_sso_users(supabase_db: testbed.Database):
    with connect(supabase_db.url) as conn:
        row = conn.execute(
            """
            SELECT i.indisunique,
                   array(SELECT a.attname::text FROM unnest(i.indkey) AS k
                         JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = k),
                   i.indexprs IS NULL,
                   pg_get_expr(i.indpred, i.indrelid)
            FROM pg_index AS i
            WHERE i.indexrelid = 'auth.users_email_partial_key'::regclass
            """
        ).fetchone()
    unique, key_columns, no_expression, predicate = row
    assert unique
    assert key_columns == ["email"]
    assert no_expression, "the key must be on email itself, not on lower(email)"
    assert predicate == "(is_sso_user = false)"


# --------------------------------------------------------------------------------------------------
# Ownership and privileges: the `postgres` login as on a hosted project
# --------------------------------------------------------------------------------------------------


def test_the_postgres_login_is_not_a_superuser_but_bypasses_rls(supabase_db: testbed.Database):
    with connect(supabase_db.url) as conn:
        me, superuser = conn.execute("SELECT current_user::text, current_setting('is_superuser')").fetchone()
        attrs = conn.execute(
            """
            SELECT rolsuper, rolbypassrls, rolcreaterole, rolcreatedb, rolreplication, rolcanlogin
            FROM pg_roles WHERE rolname = 'postgres'
            """
        ).fetchone()
        memberships = {
            r[0]
            for r in conn.execute(
                """
                SELECT g.rolname::text
                FROM pg_auth_members AS m
                JOIN pg_roles AS g ON g.oid = m.roleid
                WHERE m.member = 'postgres'::regrole
                """
            )
        }
    assert (me, superuser) == ("postgres", "off")
    assert attrs == (False, True, True, True, True, True)
    assert {
        "anon",
        "authenticated",
        "service_role",
        "pg_read_all_data",
        "pg_monitor",
        "pg_signal_backend",
    } <= memberships


@pytest.mark.parametrize("table", ["auth.users", "auth.identities"])
def test_auth_tables_belong_to_the_auth_server_and_postgres_may_write_them(
    supabase_db: testbed.Database, table
):
    with connect(supabase_db.url) as conn:
        owner, rls = conn.execute(
            "SELECT pg_get_userbyid(relowner)::text, relrowsecurity FROM pg_class WHERE oid = %s::regclass",
            (table,),
        ).fetchone()
        privileges = {
            p: scalar(conn, "SELECT has_table_privilege('postgres', %s, %s)", table, p)
            for p in ("SELECT", "INSERT", "UPDATE")
        }
        policies = scalar(conn, "SELECT count(*) FROM pg_policy WHERE polrelid = %s::regclass", table)
    assert owner == "supabase_auth_admin"
    assert owner != "postgres"
    assert privileges == {"SELECT": True, "INSERT": True, "UPDATE": True}
    assert rls, f"row level security must be enabled on {table}"
    assert policies == 0


def test_postgres_writes_auth_users_through_rls_without_policies(supabase_db: testbed.Database):
    with connect(supabase_db.url) as conn:
        user_id = insert_user(conn, email="someone@example.com")
        insert_identity(conn, user_id)
        seen = scalar(
            conn, "SELECT count(*) FROM auth.users AS u JOIN auth.identities AS i ON i.user_id = u.id"
        )
    assert seen == 1


# --------------------------------------------------------------------------------------------------
# Behaviour the reference documents (supabase-auth.md §1.1, §1.2, §2.2, §4)
# --------------------------------------------------------------------------------------------------


def test_confirmed_at_is_generated_and_refuses_a_value(supabase_db: testbed.Database):
    with connect(supabase_db.url) as conn:
        with pytest.raises(errors.GeneratedAlways, match="cannot insert a non-DEFAULT value"):
            insert_user(conn, email="a@example.com", confirmed_at="2024-01-01T00:00:00Z")
        user_id = insert_user(
            conn,
            email="a@example.com",
            email_confirmed_at="2024-03-01T00:00:00Z",
            phone_confirmed_at="2024-02-01T00:00:00Z",
        )
        earliest = scalar(
            conn, "SELECT confirmed_at = phone_confirmed_at FROM auth.users WHERE id = %s", user_id
        )
    assert earliest, "confirmed_at is LEAST(email_confirmed_at, phone_confirmed_at)"


def test_identity_email_is_generated_lowercase_from_identity_data(supabase_db: testbed.Database):
    with connect(supabase_db.url) as conn:
        user_id = insert_user(conn, email="mixed.case@example.com")
        with pytest.raises(errors.GeneratedAlways, match="cannot insert a non-DEFAULT value"):
            insert_identity(conn, user_id, email="mixed.case@example.com")
        insert_identity(
            conn, user_id, identity_data=Jsonb({"sub": str(user_id), "email": "Mixed.Case@Example.COM"})
        )
        email = scalar(conn, "SELECT email FROM auth.identities WHERE user_id = %s", user_id)
    assert email == "mixed.case@example.com"


def test_an_empty_phone_fits_only_once(supabase_db: testbed.Database):
    with connect(supabase_db.url) as conn:
        insert_user(conn, email="first@example.com", phone="")
        with pytest.raises(errors.UniqueViolation) as failure:
            insert_user(conn, email="second@example.com", phone="")
        # NULL is what "no phone" must be: any number of users may have it.
        insert_user(conn, email="third@example.com", phone=None)
        insert_user(conn, email="fourth@example.com", phone=None)
    assert failure.value.diag.constraint_name == "users_phone_key"


def test_emails_differing_only_in_case_coexist(supabase_db: testbed.Database):
    with connect(supabase_db.url) as conn:
        insert_user(conn, email="a@x.com")
        insert_user(conn, email="A@x.com")
        with pytest.raises(errors.UniqueViolation) as failure:
            insert_user(conn, email="a@x.com")
        matches = scalar(conn, "SELECT count(*) FROM auth.users WHERE lower(email) = 'a@x.com'")
    assert failure.value.diag.constraint_name == "users_email_partial_key"
    assert matches == 2, "a login matching on lower(email) would see both rows"


def test_sso_users_may_share_an_email(supabase_db: testbed.Database):
    with connect(supabase_db.url) as conn:
        insert_user(conn, email="shared@example.com", is_sso_user=True)
        insert_user(conn, email="shared@example.com", is_sso_user=True)
        insert_user(conn, email="shared@example.com", is_sso_user=False)
        count = scalar(conn, "SELECT count(*) FROM auth.users WHERE email = 'shared@example.com'")
    assert count == 3


def test_six_string_columns_store_null_when_omitted(supabase_db: testbed.Database):
    with connect(supabase_db.url) as conn:
        user_id = insert_user(conn, email="bare@example.com")
        row = conn.execute(
            """
            SELECT aud, role, confirmation_token, recovery_token, email_change_token_new, email_change,
                   email_change_token_current, phone_change, phone_change_token, reauthentication_token,
                   email_change_confirm_status, created_at, updated_at
            FROM auth.users WHERE id = %s
            """,
            (user_id,),
        ).fetchone()
    assert row[:6] == (None,) * 6, "these have no default: an INSERT that omits them stores NULL"
    assert row[6:10] == ("",) * 4, "these default to ''"
    assert row[10] == 0
    assert row[11:] == (None, None), "created_at and updated_at have no default either"


def test_the_email_change_status_is_checked_between_0_and_2(supabase_db: testbed.Database):
    with connect(supabase_db.url) as conn:
        insert_user(conn, email="two@example.com", email_change_confirm_status=2)
        with pytest.raises(errors.CheckViolation) as failure:
            insert_user(conn, email="three@example.com", email_change_confirm_status=3)
    assert failure.value.diag.constraint_name == "users_email_change_confirm_status_check"


def test_deleting_a_user_deletes_its_identities(supabase_db: testbed.Database):
    with connect(supabase_db.url) as conn:
        user_id = insert_user(conn, email="gone@example.com")
        insert_identity(conn, user_id)
        conn.execute("DELETE FROM auth.users WHERE id = %s", (user_id,))
        left = scalar(conn, "SELECT count(*) FROM auth.identities WHERE user_id = %s", user_id)
    assert left == 0
