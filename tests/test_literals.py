"""Values inlined into a ``COPY (query)`` as literals read back on the server exactly as the same values
bound as parameters do, whatever characters they hold and whatever ``standard_conforming_strings`` says."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from devkit.testbed import Database
from sync.connect import Endpoint, Side, connect
from sync.pipe import pipe_copy
from sync.sqltext import PackedIds, inline, literal

AWKWARD_TEXT = ["", "it's", "back\\slash", 'a "quote"', "{braces},commas", "NULL", "$1 and $2", "ñ ü 日本"]
VALUES: list[tuple[Any, str]] = [
    *((t, "text") for t in AWKWARD_TEXT),
    (None, "text"),
    ([*AWKWARD_TEXT, None, " "], "text[]"),
    ([], "text[]"),
    (2**62, "bigint"),
    (-7, "bigint"),
    ([1, -2, 2**40], "bigint[]"),
    (True, "boolean"),
    ([uuid.UUID(int=1), uuid.uuid4()], "uuid[]"),
    (
        PackedIds(b"".join(u.bytes for u in (uuid.UUID(int=1), uuid.uuid4(), uuid.UUID(int=2**128 - 1)))),
        "uuid[]",
    ),
    (PackedIds(b""), "uuid[]"),
    (datetime(2024, 11, 18, 3, 4, 5, 678901, tzinfo=UTC), "timestamptz"),
    (datetime(2024, 11, 18, 3, 4, 5, tzinfo=timezone(timedelta(hours=-6))), "timestamptz"),
    (datetime(2024, 11, 18, 3, 4, 5), "timestamptz"),
    (date(2024, 2, 29), "date"),
    (Decimal("-12.3400"), "numeric"),
]


@pytest.mark.parametrize("conforming", ["on", "off"])
async def test_inlined_values_read_as_the_same_values_bound(supabase_db: Database, conforming: str) -> None:
    conn = await connect(Endpoint.parse(Side.TARGET, supabase_db.admin_url))
    try:
        await conn.execute(f"SET standard_conforming_strings = {conforming}")
        for value, sql_type in VALUES:
            query = f"SELECT $1::{sql_type} AS v"
            bound = await conn.fetchval(query, list(value) if isinstance(value, PackedIds) else value)
            inlined = await conn.fetchval(inline(query, [value]))
            assert inlined == bound, (value, sql_type)
            assert inlined is not None or value is None
    finally:
        await conn.close()


async def test_placeholders_are_replaced_once_each_and_by_number(supabase_db: Database) -> None:
    args = [f"v{n}" for n in range(1, 12)]
    args[0] = "$2 stays as written"
    query = "SELECT " + ", ".join(f"${n}::text" for n in range(11, 0, -1))
    assert inline(query, []) == query
    conn = await connect(Endpoint.parse(Side.TARGET, supabase_db.admin_url))
    try:
        assert list(await conn.fetchrow(inline(query, args))) == args[::-1]
    finally:
        await conn.close()


async def test_dollar_digits_in_names_strings_and_comments_are_not_placeholders(make_db: Any) -> None:
    db = make_db()
    conn = await connect(Endpoint.parse(Side.TARGET, db.admin_url))
    try:
        await conn.execute('CREATE TABLE public."t$1" ("a$1" int, "b$2" text)')
        await conn.execute("INSERT INTO public.\"t$1\" VALUES (1, 'one'), (2, 'two')")
        query = (
            "SELECT \"a$1\", \"b$2\", 'it''s $2' AS s, E'\\\\$2\\'' AS e FROM public.\"t$1\" -- a $2 here\n"
            'WHERE "a$1" = $1::int /* or $2 */'
        )
        rows = await conn.fetch(inline(query, [2]))
    finally:
        await conn.close()
    assert [tuple(r) for r in rows] == [(2, "two", "it's $2", "\\$2'")]


def test_packed_ids_read_as_the_uuids_they_pack() -> None:
    ids = [uuid.uuid4() for _ in range(5)]
    packed = PackedIds(b"".join(u.bytes for u in ids))
    assert len(packed) == 5 and list(packed) == ids and packed[1] == ids[1] and packed[-1] == ids[-1]
    assert packed[1:3] == ids[1:3]
    with pytest.raises(IndexError):
        packed[5]
    with pytest.raises(ValueError):
        PackedIds(b"short")


def test_a_value_without_a_literal_is_refused() -> None:
    with pytest.raises(TypeError):
        literal(object())
    with pytest.raises(ValueError):
        literal("nul\x00inside")


async def test_a_pipe_copies_the_rows_its_inlined_arguments_select(make_db: Any) -> None:
    source, target = make_db(), make_db()
    sconn = await connect(Endpoint.parse(Side.SOURCE, source.admin_url))
    tconn = await connect(Endpoint.parse(Side.TARGET, target.admin_url))
    try:
        await sconn.execute("CREATE TABLE public.t (id int, note text)")
        await sconn.execute("INSERT INTO public.t SELECT n, 'note ' || n FROM generate_series(1, 50) AS n")
        await sconn.execute("INSERT INTO public.t VALUES (51, $1)", "it's $1 \\ {x}")
        await tconn.execute("CREATE TABLE public.t (id int, note text)")
        query = "SELECT id, note FROM public.t WHERE id = ANY ($1::int[]) OR note = $2::text"
        copied = await pipe_copy(sconn, query, [[3, 5, 8], "it's $1 \\ {x}"], tconn, "public.t")
        rows = await tconn.fetch("SELECT id, note FROM public.t ORDER BY id")
    finally:
        await sconn.close()
        await tconn.close()
    assert copied == 4
    assert [tuple(r) for r in rows] == [(3, "note 3"), (5, "note 5"), (8, "note 8"), (51, "it's $1 \\ {x}")]
