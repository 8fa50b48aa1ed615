"""Passwords never reach a message: the one redactor, keyed on parsed passwords and URLs' user-info."""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qsl, urlsplit

import psycopg
import pytest
from click.testing import CliRunner

from sync.cli import main
from sync.connect import Endpoint, Side, connect, connect_arguments, password_of, redact


def test_passwords_are_redacted_from_urls():
    assert redact("postgresql://u:s3cret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact("postgresql://u@h/db") == "postgresql://u@h/db"


def test_a_parsed_password_is_redacted_wherever_it_appears():
    endpoint = Endpoint.parse(Side.TARGET, "host=h user=u password=pa55-word dbname=d")
    assert endpoint.password == "pa55-word"
    message = 'FATAL: password "pa55-word" rejected for postgres://other:hidden@elsewhere:5432/x'
    assert (
        endpoint.redact(message) == 'FATAL: password "***" rejected for postgres://other:***@elsewhere:5432/x'
    )


def test_the_password_of_a_dsn_is_read_by_libpq_rules():
    assert password_of("postgresql://u:p%40ss@h/db") == "p@ss"
    assert password_of("host=h user=u") is None
    assert password_of("not a dsn") is None


MALFORMED = {
    "an @ in the password": "postgresql://u:Zq7@Xw9@localhost/db",
    "a / in the password": "postgresql://u:Zq7/Xw9@localhost/db",
    "a % in the password": "postgresql://u:Zq7%Xw9@localhost/db",
    "a non-numeric port": "postgresql://u:Zq7Xw9@localhost:abc/db",
    "a key=value port that is not a number": "host=localhost port=abc user=u password=Zq7Xw9",
    "an unknown URL parameter": "postgresql://u:Zq7Xw9@localhost/db?sslmod=require",
    "an unknown sslmode": "postgresql://u:Zq7Xw9@localhost/db?sslmode=yes",
    "an unterminated quote": "host=localhost user=u password='Zq7 Xw9",
}


@pytest.mark.parametrize("dsn", MALFORMED.values(), ids=MALFORMED.keys())
@pytest.mark.parametrize("command", ["plan", "run", "verify"])
def test_a_malformed_dsn_is_one_line_exit_2_without_any_piece_of_the_password(dsn, command):
    result = CliRunner().invoke(main, [command, "--source", dsn, "--target", "postgresql://u@localhost/x"])
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: The source DSN"), result.stderr
    assert "Zq7" not in result.stderr and "Xw9" not in result.stderr


def test_tls_session_targeting_and_options_reach_asyncpg_as_libpq_read_them():
    endpoint = Endpoint.parse(
        Side.SOURCE,
        "postgresql://u:p@db.example.com:6000/app?sslmode=verify-full&sslrootcert=/etc/ca.pem"
        "&target_session_attrs=read-write&options=-c%20search_path%3Dapp%2Cpublic%20-c%20work_mem%3D64MB"
        "&connect_timeout=7",
    )
    arguments = connect_arguments(endpoint)
    assert arguments["host"] == "db.example.com" and arguments["port"] == 6000
    assert arguments["server_settings"] == {"search_path": "app,public", "work_mem": "64MB"}
    assert arguments["timeout"] == 7
    passed = dict(parse_qsl(urlsplit(arguments["dsn"]).query))
    assert passed == {
        "sslmode": "verify-full",
        "sslrootcert": "/etc/ca.pem",
        "target_session_attrs": "read-write",
    }
    several = connect_arguments(Endpoint.parse(Side.TARGET, "host=a,b port=5432,5433 dbname=d"))
    assert several["host"] == ["a", "b"] and several["port"] == [5432, 5433]


def test_a_dsns_options_and_session_attributes_hold_on_the_connection(supabase_db):
    info = psycopg.conninfo.conninfo_to_dict(supabase_db.url)
    dsn = psycopg.conninfo.make_conninfo(
        supabase_db.url,
        options="-c search_path=auth,public -c work_mem=3MB",
        target_session_attrs="read-write",
        sslmode="disable",
    )
    assert info["host"]

    async def read() -> tuple[str, ...]:
        conn = await connect(Endpoint.parse(Side.TARGET, dsn))
        try:
            shown = ("search_path", "work_mem", "statement_timeout", "jit")
            return tuple([await conn.fetchval(f"SHOW {name}") for name in shown])
        finally:
            await conn.close()

    # The DSN's own settings, and the session's: a long statement timeout, and no JIT compilation.
    assert asyncio.run(read()) == ("auth,public", "3MB", "10min", "off")
