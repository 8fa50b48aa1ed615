"""One server's ``COPY (query) TO STDOUT`` streamed into another's ``COPY table FROM STDIN``, rows never
decoded in Python: both servers work at once, the client only hands the bytes on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import asyncpg

from sync.sqltext import inline


async def pipe_copy(
    sconn: asyncpg.Connection,
    query: str,
    args: Sequence[object],
    tconn: asyncpg.Connection,
    table: str,
    columns: Sequence[str] | None = None,
    copy_format: str = "binary",
) -> int:
    """Stream the rows of ``query`` (with ``args``) on ``sconn`` into ``table`` (``schema.name`` or a
    temporary table's name) on ``tconn``; how many. ``args`` are inlined as literals (COPY binds none):
    the driver's way asks the server to prepare the query and quote them first, two round trips and a
    look-up of every type it has not met on that connection before each COPY.

    Both ends finish before anything is raised: if the load fails, the source's COPY is drained, so the
    source connection (and the transaction it may hold) stays usable.
    """
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=16)
    ended = False

    async def sink(chunk: bytes) -> None:
        await queue.put(bytes(chunk))

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal ended
        while (chunk := await queue.get()) is not None:
            yield chunk
        ended = True

    async def produce() -> None:
        try:
            await sconn.copy_from_query(inline(query, args), output=sink, format=copy_format)
        finally:
            await queue.put(None)

    schema, _, name = table.rpartition(".")
    producer = asyncio.create_task(produce())
    try:
        status = await tconn.copy_to_table(
            name, schema_name=schema or None, source=chunks(), columns=columns, format=copy_format
        )
    finally:
        while not ended and await queue.get() is not None:
            pass
        await producer
    return int(status.split()[-1])
