"""Connection strings read as libpq reads them: every string compared with libpq's own parse."""

from __future__ import annotations

import random
from urllib.parse import unquote_to_bytes

import psycopg
import pytest

from sync.conninfo import KEYWORDS, ConninfoError, parse_conninfo

REFUSED = "refused"

# What users paste: the dashboard's direct and pooler strings, encoded passwords, several hosts, IPv6,
# key=value strings with quotes and escapes, the environment's empty string.
PASTED = [
    "",
    "postgresql://postgres:s3cret@db.abcdefghijklmnop.supabase.co:5432/postgres",
    "postgresql://postgres.abcdefghijklmnop:s3cret@aws-0-eu-central-1.pooler.supabase.com:6543/postgres",
    "postgres://postgres.abc:p%40ss%23w%3Ard%2F%3F%25@aws-0-eu-central-1.pooler.supabase.com:5432/postgres",
    "postgresql://u:p@h/db?sslmode=verify-full&sslrootcert=/etc/ssl/ca.pem&application_name=x",
    "postgresql://u@h1:5432,h2:5433,h3/db?target_session_attrs=read-write",
    "postgresql://[::1]:5433/db",
    "postgresql://[2001:db8::7],h:1/db?connect_timeout=7&ssl=true",
    "postgresql:///db?host=/var/run/postgresql",
    "postgresql://",
    "postgresql://%2Fvar%2Frun%2Fpostgresql/db",
    "postgresql://h/db?options=-c%20search_path%3Dapp%2Cpublic",
    "postgresql://h/db?requiressl=1",
    "postgresql://u:Zq7@Xw9@localhost/db",
    "postgresql://u:p@h:abc/db",
    "postgresql://h/db?sslmod=require",
    "postgresql://h/db?a",
    "postgresql://h/db?a=b=c",
    "postgresql://h/%zz",
    "postgresql://h/d%00",
    "postgresql://[::1",
    "postgresql://[]/db",
    "postgresql://[::1]x/db",
    "postgresql://h/db?sslmode=require&",
    "postgresql://h/db?sslmode=require&&",
    "host=localhost port=5432 dbname=postgres user=postgres password=secret",
    "host = localhost  port=  5432\tdbname =postgres",
    "password='a b\\'c\\\\d' user=x",
    "password=a\\ b user=x",
    "password='' user=x",
    "password='unterminated",
    "host=a b",
    "nonsense=1",
    "=1",
    "host=h sslmode=require requiressl=0",
    "dbname=postgresql://h/db",
]


def libpq(text: str) -> dict[str, str] | str:
    try:
        return psycopg.conninfo.conninfo_to_dict(text)
    except psycopg.ProgrammingError:
        return REFUSED


def ours(text: str) -> dict[str, str] | str:
    try:
        return parse_conninfo(text)
    except ConninfoError:
        return REFUSED


def utf8_escapes(text: str) -> bool:
    try:
        unquote_to_bytes(text).decode()
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.parametrize("text", PASTED)
def test_a_pasted_connection_string_reads_as_libpq_reads_it(text):
    assert ours(text) == libpq(text)


def test_random_connection_strings_read_as_libpq_reads_them():
    """Strings built from the characters that matter to the grammar: both refuse, or both give the same."""
    pieces = [*" =':\\@/?&,[]%0aF\t", "%2C", "%40", "%20", "%e2%82%ac", "::1", "5432", "true", "1"]
    pieces += ["host", "user", "port", "dbname", "password", "sslmode", "ssl", "requiressl"]
    if psycopg.pq.version() < 180000:
        pieces.remove(" ")  # older libpq keeps spaces in URLs; libpq 18 trims them or refuses them
    starts = [
        "postgresql://",
        "postgres://",
        "",
        "host=",
        "user=u password=",
        "postgresql://u:p@",
        "postgres://h/d?",
    ]
    rng = random.Random(20261202)
    compared = refused = 0
    for _ in range(30_000):
        text = rng.choice(starts) + "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        if not utf8_escapes(text):
            continue  # refused here; libpq refuses it too unless a later setting replaces the value
        expected = libpq(text)
        assert ours(text) == expected, text
        compared += 1
        refused += expected == REFUSED
    assert 0.1 < refused / compared < 0.9  # both outcomes were exercised


def test_every_keyword_libpq_knows_is_known():
    known = {option.keyword.decode() for option in psycopg.pq.Conninfo.get_defaults()}
    assert known <= KEYWORDS


def test_spaces_around_url_parts_are_dropped_and_inside_them_refused():
    assert parse_conninfo("postgresql:// h /d ") == {"host": "h", "dbname": "d"}
    assert parse_conninfo("postgresql://h/d%20") == {"host": "h", "dbname": "d "}
    with pytest.raises(ConninfoError, match="percent-encoded spaces"):
        parse_conninfo("postgresql://h/my db")
