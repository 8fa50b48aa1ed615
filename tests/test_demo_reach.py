"""The demo's databases can be reached at once, and the demo builds into plain PostgreSQL too."""

from __future__ import annotations

import re

import psycopg
from click.testing import CliRunner
from queries import fetch

from devkit import testbed
from sync.cli import main


def exports(output: str) -> dict[str, str]:
    return dict(re.findall(r"^export (SYNC_SOURCE_URL|SYNC_TARGET_URL)='([^']+)'$", output, flags=re.M))


def test_sync_demo_ends_with_ready_to_paste_urls_of_its_own_databases():
    result = CliRunner().invoke(main, ["demo", "--no-sync"])
    assert result.exit_code == 0, result.output
    assert "The demo's databases (the passwords are the demo's own throwaway ones):" in result.output
    urls = exports(result.output)
    assert set(urls) == {"SYNC_SOURCE_URL", "SYNC_TARGET_URL"}
    assert f"{testbed.APP_ROLE}:{testbed.APP_PASSWORD}@" in urls["SYNC_SOURCE_URL"]
    for url in urls.values():
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM public.profiles").fetchone()[0] > 0
    assert "Next: sync plan --since 2024-11-18, then sync run with the same --since." in result.output


def test_sync_demo_gives_empty_plain_databases_supabases_shape_and_says_what_next(make_db):
    source, target = make_db("template0"), make_db("template0")
    result = CliRunner().invoke(
        main, ["demo", "--no-sync", "--source", source.admin_url, "--target", target.admin_url]
    )
    assert result.exit_code == 0, result.output
    for side in ("source", "target"):
        assert (
            f"The {side} database had no auth schema: Supabase's auth and storage schemas were created."
        ) in result.output
    assert fetch(source.url, "SELECT count(*) FROM auth.users")[0][0] == 4082
    assert "Your databases (passwords hidden: put yours back in):" in result.output
    assert "supabase_admin:***@" in exports(result.output)["SYNC_SOURCE_URL"]
    assert "Next: sync plan --since 2024-11-18" in result.output


def test_sync_demo_says_in_one_line_when_the_login_may_not_create_the_shape(make_db):
    source, target = make_db("template0"), make_db("template0")
    result = CliRunner().invoke(main, ["demo", "--no-sync", "--source", source.url, "--target", target.url])
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and "The source database has no auth schema and role 'postgres' may not create" in lines[0]
    )
    assert fetch(source.admin_url, "SELECT to_regnamespace('auth') IS NULL")[0][0]
