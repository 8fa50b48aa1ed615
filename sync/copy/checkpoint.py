"""Where a table's copy stands, in ``_sync.checkpoints``: its passes, and the parts of a split pass.

A table's checkpoint row keeps the pass (the window, then the closure) and the last source key done.
A pass of several batches may be split into contiguous key ranges copied at once (parts): each part
has a row of its own, ``<table> (part N)``, keeping its pass, the last key done and where the part
ends. The parts are recorded before any of them writes, so a rerun copies the same ranges and resumes
each where it stopped. Every row is written in the transaction of the batch it counts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from sync.sqltext import Pending


@dataclass(frozen=True)
class Position:
    """Where a copy stands: the pass and the last source key done (as text, as the key is kept)."""

    phase: int
    key: list[str] | None
    done: bool = False
    """For a part: its last key is done."""


@dataclass(frozen=True)
class Part:
    """A key range of one pass, copied at once with the pass's other parts: keys in (after, upto]."""

    name: str
    """Its checkpoint row's name."""
    phase: int
    after: list[str] | None
    upto: list[str] | None
    """The part's last key; None: to the end of the table."""
    boundaries: Sequence[list[str]] | None = None
    """The last keys of its full batches, when the pass has just read them (else read again)."""


class Checkpoint:
    """The checkpoint rows of one table copy (``name``) in run ``run_id``: the table's and its parts'."""

    def __init__(self, run_id: int, name: str) -> None:
        self.run_id = run_id
        self.name = name
        self.part_prefix = f"{name} (part "

    async def load(self, conn: asyncpg.Connection) -> tuple[Position, bool, int]:
        """Where an earlier attempt of this run stopped: position, whether done, rows committed (its
        parts' included)."""
        row = await conn.fetchrow(
            "SELECT last_key, done, (SELECT sum(rows_done) FROM _sync.checkpoints WHERE run_id = $1 "
            "AND (table_name = $2 OR starts_with(table_name, $3)))::bigint AS rows_done "
            "FROM (SELECT) AS one LEFT JOIN _sync.checkpoints ON run_id = $1 AND table_name = $2",
            self.run_id,
            self.name,
            self.part_prefix,
        )
        rows_done = row["rows_done"] or 0
        if not row["last_key"]:
            return Position(0, None), bool(row["done"]), rows_done
        saved = json.loads(row["last_key"])
        return Position(saved["pass"], saved["key"]), row["done"], rows_done

    async def mark_done(self, conn: asyncpg.Connection) -> None:
        await conn.execute(
            "INSERT INTO _sync.checkpoints (run_id, table_name, done) VALUES ($1, $2, true) "
            "ON CONFLICT (run_id, table_name) DO UPDATE SET done = true, updated_at = now()",
            self.run_id,
            self.name,
        )

    async def advance(
        self, conn: asyncpg.Connection | Pending, position: Position, rows: int, part: Part | None = None
    ) -> None:
        """Move the table's checkpoint, or ``part``'s (which also keeps where the part ends)."""
        saved: dict[str, Any] = {"pass": position.phase, "key": position.key}
        if part is not None:
            saved["upto"] = part.upto
        await conn.execute(
            "INSERT INTO _sync.checkpoints (run_id, table_name, last_key, rows_done, done) "
            "VALUES ($1, $2, $3, $4, $5) "
            "ON CONFLICT (run_id, table_name) DO UPDATE SET last_key = EXCLUDED.last_key, "
            "rows_done = _sync.checkpoints.rows_done + EXCLUDED.rows_done, done = EXCLUDED.done, "
            "updated_at = now()",
            self.run_id,
            part.name if part is not None else self.name,
            json.dumps(saved),
            rows,
            position.done,
        )

    def split(
        self, number: int, after: list[str] | None, boundaries: list[list[str]], count: int
    ) -> list[Part]:
        """Pass ``number``'s batches after ``after`` (ending at ``boundaries``, then at the table's end) in
        ``count`` contiguous parts, or as many as there are batches; none when that is one."""
        batches = len(boundaries) + 1
        count = min(count, batches)
        if count < 2:
            return []
        ends: list[list[str] | None] = [*boundaries, None]
        parts, first = [], 0
        for index in range(count):
            last = first + (batches - first) // (count - index)  # the part's batches end at ends[first:last]
            parts.append(
                Part(
                    name=f"{self.part_prefix}{index + 1})",
                    phase=number,
                    after=after if first == 0 else ends[first - 1],
                    upto=ends[last - 1],
                    boundaries=boundaries[first : last - 1],
                )
            )
            first = last
        return parts

    async def record_parts(self, conn: asyncpg.Connection, parts: Sequence[Part]) -> None:
        """Record the parts of a pass (inside the caller's transaction), before any of them writes."""
        for part in parts:
            await self.advance(conn, Position(part.phase, part.after), 0, part)

    async def recorded_parts(self, conn: asyncpg.Connection, number: int) -> list[Part] | None:
        """The unfinished parts of pass ``number`` an earlier attempt of this run recorded; None when
        the pass was not split (an empty list: it was, and every part is done)."""
        rows = await conn.fetch(
            "SELECT table_name, last_key, done FROM _sync.checkpoints "
            "WHERE run_id = $1 AND starts_with(table_name, $2) ORDER BY table_name",
            self.run_id,
            self.part_prefix,
        )
        parts, split = [], False
        for row in rows:
            saved = json.loads(row["last_key"])
            if saved["pass"] != number:
                continue  # a part of an earlier pass (all done before this pass began)
            split = True
            if not row["done"]:
                parts.append(Part(row["table_name"], number, saved["key"], saved["upto"]))
        return parts if split else None
