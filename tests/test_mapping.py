"""Mapping files: the shipped one teaches the format; a malformed one is named by file, table and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from sync.errors import MappingError
from sync.mapping import Mapping, load_mapping

PROJECT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sync.toml"
    path.write_text(text)
    return path


def error_of(path: Path) -> str:
    with pytest.raises(MappingError) as caught:
        load_mapping(path)
    assert caught.value.exit_code == 2
    return str(caught.value)


def test_the_shipped_mapping_describes_the_seed_scenario():
    mapping = load_mapping(PROJECT / "mappings" / "sync.toml")

    assert mapping.sync.schemas == ["public"] and mapping.sync.auth == "direct"
    profiles = mapping.rule("public.profiles")
    assert profiles.key == "preserve" and profiles.rename == {"full_name": "display_name"}
    for table in ("public.financing_requests", "public.bank_profiles", "public.documents"):
        assert mapping.rule(table).key == "remap"
        assert mapping.rule(table).match_on == ["created_at", "profile_id"]
    # Comments teach the format: every setting a table may take is shown.
    text = (PROJECT / "mappings" / "sync.toml").read_text()
    for setting in ("natural =", "ignore =", "defaults =", "policy =", "since = false", "skip = true"):
        assert setting in text


def test_without_a_file_the_default_one_is_used_when_present(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_mapping(None) == Mapping()
    assert load_mapping(None).origin == "the built-in defaults"

    (tmp_path / "mappings").mkdir()
    (tmp_path / "mappings" / "sync.toml").write_text("[sync]\nbatch_size = 100\n")
    mapping = load_mapping(None)
    assert mapping.sync.batch_size == 100
    assert mapping.origin == str(Path("mappings") / "sync.toml")


def test_an_unknown_strategy_is_named_with_file_table_and_key(tmp_path):
    path = write(tmp_path, '[tables."public.x"]\nkey = "remapp"\n')

    assert (
        error_of(path) == f"{path}: tables.\"public.x\".key: 'remapp' is not one of preserve, remap, natural"
    )


def test_an_unknown_key_lists_the_ones_that_exist(tmp_path):
    path = write(tmp_path, '[tables."public.x"]\nmatch = ["created_at"]\n')

    assert error_of(path) == (
        f'{path}: tables."public.x".match: unknown key (expected one of key, match_on, natural, since, '
        "policy, rename, ignore, defaults, skip, triggers, storage)"
    )


def test_broken_toml_says_where(tmp_path):
    path = write(tmp_path, '[sync]\nschemas = ["public"]\nauth = direct\n')

    message = error_of(path)

    assert message.startswith(f"{path}: not valid TOML: ")
    assert message.endswith("(at line 3, column 8)")


def test_every_malformed_setting_is_reported(tmp_path):
    path = write(
        tmp_path,
        '[sync]\nauth = "api"\nbatch_size = 0\n'
        '[tables."public.x"]\nignore = "legacy"\npolicy = "latest-wins"\nsince = 3\n',
    )

    assert error_of(path).splitlines() == [
        f"{path}: sync.auth: 'api' is not one of direct, admin-api",
        f"{path}: sync.batch_size: Input should be greater than or equal to 1",
        f'{path}: tables."public.x".since: '
        "expected a column name, or false to read the whole table every run",
        f'{path}: tables."public.x".policy: '
        "'latest-wins' is not one of source-wins, target-wins, newest-wins",
        f'{path}: tables."public.x".ignore: Input should be a valid list',
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[tables.profiles]\nkey = "preserve"\n', 'tables."profiles": name the table as "schema.table"'),
        ('[tables."public.x"]\nkey = "natural"\n', 'tables."public.x": key = "natural" needs natural = ['),
        (
            '[tables."public.x"]\nignore = ["a"]\nrename = { a = "b" }\n',
            "column 'a' is both ignored and renamed",
        ),
        ('[tables."public.x"]\nrename = { a = "c", b = "c" }\n', "two columns are renamed to 'c'"),
        ('[sync]\nschemas = ["public", "auth"]\n', "sync.schemas: schema 'auth' cannot be synced as rows"),
        ('[tables."public.x"]\ntriggers = "off"\n', "'off' is not one of fire, skip"),
    ],
)
def test_rules_that_cannot_work_are_refused(tmp_path, text, expected):
    path = write(tmp_path, text)

    assert expected in error_of(path)


def test_a_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.toml"

    assert error_of(missing).startswith(f"{missing}: cannot read the mapping file")


def test_since_false_reads_whole_tables_and_names_with_quotes_are_kept(tmp_path):
    path = write(
        tmp_path, '[tables."public.Odd Table"]\nsince = false\nrename = { "Quote\\"d" = "quoted" }\n'
    )

    rule = load_mapping(path).rule("public.Odd Table")

    assert rule.since is False
    assert rule.rename == {'Quote"d': "quoted"}


def test_a_storage_column_and_whole_buckets_are_read_and_a_typo_in_them_is_named(tmp_path):
    path = write(
        tmp_path,
        '[storage]\nbuckets = ["avatars"]\nconcurrency = 8\n'
        '[tables."public.documents"]\n'
        'storage = { column = "storage_path", bucket = "documents", owner_prefix = true }\n',
    )
    mapping = load_mapping(path)
    rule = mapping.rule("public.documents").storage

    assert (mapping.storage.buckets, mapping.storage.concurrency) == (["avatars"], 8)
    assert rule is not None and (rule.column, rule.bucket, rule.owner_prefix) == (
        "storage_path",
        "documents",
        True,
    )
    bad = write(
        tmp_path, '[tables."public.documents"]\nstorage = { column = "p", bucket = "d", prefix = true }\n'
    )
    assert error_of(bad) == (
        f'{bad}: tables."public.documents".storage.prefix: unknown key '
        "(expected one of column, bucket, owner_prefix)"
    )
