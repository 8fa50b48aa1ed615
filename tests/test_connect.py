"""Passwords never reach a message: the one redactor, keyed on parsed passwords and URLs' user-info."""

from __future__ import annotations

from sync.connect import Endpoint, Side, password_of, redact


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
