"""Production deletes in a large table: exact, and found by reading only the keys of buckets that differ.

Production and the development copy share thousands of items from before the copy (2024-11-18).
Afterwards production adds rows and deletes a few; development deletes some production rows of its own
accord and adds its own. Only production's deletes of rows the target got from production are
reported, and finding them reads the keys of a few buckets, not the table.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
from click.testing import CliRunner
from queries import execute, fetch

from sync.cli import main
from sync.compare import bucket_count
from sync.deletes.find import Finder

SINCE = datetime(2024, 11, 18, tzinfo=UTC)
ITEMS = 6000
ITEMS_TABLE = """
CREATE TABLE public.items (id bigint PRIMARY KEY, body text, created_at timestamptz NOT NULL);
INSERT INTO public.items SELECT n, 'item ' || n, '2024-10-01' FROM generate_series(1, {count}) AS n;
"""
MAPPING = '[tables."public.items"]\nkey = "preserve"\n'


def items(url: str, count: int = ITEMS) -> None:
    execute(url, ITEMS_TABLE.format(count=count))


def delete(url: str, ids: list[int]) -> None:
    execute(url, "DELETE FROM public.items WHERE id = ANY(%s)", ids)


def add(url: str, ids: range, at: str) -> None:
    execute(
        url,
        "INSERT INTO public.items SELECT n, 'added ' || n, %s FROM unnest(%s::bigint[]) AS n",
        at,
        list(ids),
    )


def first_keys(ids: set[int]) -> list[str]:
    """The first five keys as the report orders them (by their text)."""
    return sorted(str(i) for i in ids)[:5]


def run(source, target, mapping: Path, *options: str) -> dict:
    """``sync run --json`` with ``options``: the report it prints."""
    args = ["run", "--source", source.url, "--target", target.url, "--mapping", str(mapping), "--json"]
    result = CliRunner().invoke(main, [*args, *options])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def items_deletes(report: dict) -> tuple[int, list[str], int]:
    (found,) = [d for d in report["deletes"]["tables"] if d["table"] == "public.items"]
    return found["found"], found["keys"], found["deleted"]


async def find_items(source, target, copied: datetime):
    sconn, tconn = await asyncpg.connect(source.url), await asyncpg.connect(target.url)
    try:
        async with tconn.transaction():
            finder = await Finder.open(sconn, tconn, copied)
            return await finder.find("public.items", "public.items", "id::text", "t.id::text", "created_at")
    finally:
        await sconn.close()
        await tconn.close()


STALE_STATISTICS = """
ALTER TABLE public.items SET (autovacuum_enabled = off);
CREATE TEMP TABLE later AS SELECT * FROM public.items WHERE id > 50;
DELETE FROM public.items WHERE id > 50;
ANALYZE public.items;
INSERT INTO public.items SELECT * FROM later;
"""


@pytest.mark.parametrize("statistics", ["current", "stale"])
def test_a_few_production_deletes_in_a_large_table_are_exact_and_read_few_keys(make_db, statistics):
    source, target = make_db(), make_db()
    for db in (source, target):
        items(db.url)
    production_deleted = {17, 950, 2222, 3001, 4500, 5999, 6000}
    development_deleted = {5, 6, 950, 1200, *range(3100, 3120), 4242}
    delete(source.url, sorted(production_deleted))
    add(source.url, range(ITEMS + 1, ITEMS + 21), "2024-12-01")
    delete(target.url, sorted(development_deleted))
    add(target.url, range(7001, 7041), "2024-12-05")
    # Stale statistics say 50 rows: one bucket, which is split because it holds thousands of keys.
    execute(source.url, "ANALYZE public.items" if statistics == "current" else STALE_STATISTICS)

    found = asyncio.run(find_items(source, target, SINCE))

    expected = production_deleted - development_deleted
    assert (found.count, found.keys) == (len(expected), first_keys(expected))
    # Dozens of buckets differ (deletes on either side, new production rows); their keys alone are read.
    assert 0 < found.read < ITEMS // 2


def test_an_equal_table_reads_no_key(make_db):
    source, target = make_db(), make_db()
    for db in (source, target):
        items(db.url)
    found = asyncio.run(find_items(source, target, SINCE))
    assert (found.count, found.keys, found.read) == (0, [], 0)


def test_production_deletes_never_include_rows_development_deleted(make_db, tmp_path):
    source, target = make_db(), make_db()
    mapping = tmp_path / "sync.toml"
    mapping.write_text(MAPPING)
    for db in (source, target):
        items(db.url, 3000)
    add(source.url, range(3001, 3501), "2024-12-01")
    first = run(source, target, mapping, "--since", "2024-11-18")
    assert items_deletes(first) == (0, [], 0)
    assert fetch(target.url, "SELECT count(*) FROM public.items") == [(3500,)]

    # Development deletes rows from its copy and rows the first run landed; production deletes others
    # of both kinds, and three that development deleted too.
    development_deleted = {*range(100, 120), 3010, 3020, 3030, 3040, 3050, 3060, 3070, 3080, 3090, 3100, 42}
    production_deleted = {7, 1500, 2999, 3000, 3001, 3250, 3400, 3500, 42, 3010, 110}
    delete(target.url, sorted(development_deleted))
    delete(source.url, sorted(production_deleted))
    add(target.url, range(9001, 9031), "2024-12-10")
    expected = production_deleted - development_deleted

    reported = run(source, target, mapping)
    assert items_deletes(reported) == (len(expected), first_keys(expected), 0)
    assert fetch(target.url, "SELECT count(*) FROM public.items") == [(3500 - 31 + 30,)]

    applied = run(source, target, mapping, "--deletes", "apply")
    assert items_deletes(applied) == (len(expected), first_keys(expected), len(expected))
    left = {r[0] for r in fetch(target.url, "SELECT id FROM public.items")}
    assert not left & (expected | development_deleted)
    assert set(range(9001, 9031)) <= left
    assert len(left) == 3500 - len(development_deleted) - len(expected) + 30

    assert items_deletes(run(source, target, mapping)) == (0, [], 0)


def test_a_production_that_outgrew_the_copy_has_every_key_compared_at_once(make_db):
    """Production gained half as many rows again since the copy: nearly every bucket would differ, so
    the search reads every key without the sums, and is as exact."""
    source, target = make_db(), make_db()
    for db in (source, target):
        items(db.url)
    production_deleted = {3, 2500, 5998}
    delete(source.url, sorted(production_deleted))
    add(source.url, range(ITEMS + 1, ITEMS + 3001), "2024-12-01")
    add(target.url, range(9001, 9011), "2024-12-05")
    for db in (source, target):
        execute(db.url, "ANALYZE public.items")

    async def outgrown() -> bool:
        sconn, tconn = await asyncpg.connect(source.url), await asyncpg.connect(target.url)
        try:
            finder = await Finder.open(sconn, tconn, SINCE)
            return await finder._outgrown("public.items", ITEMS + 3000 - 3, bucket_count(ITEMS + 3000 - 3))
        finally:
            await sconn.close()
            await tconn.close()

    assert asyncio.run(outgrown())
    found = asyncio.run(find_items(source, target, SINCE))
    assert (found.count, found.keys) == (3, first_keys(production_deleted))
    assert found.read == ITEMS + 3000 - 3
