"""The keys of a pass listed once, so that each batch reads exactly its own keys.

The closure's pass selects the rows a selected row needs: its condition is a query over every table
that points at this one. Read by key ranges, that query would run again for every batch; listing the
pass's keys once (in the pass's one ordered scan) and reading each batch by ``key = ANY(its keys)``
runs it once per pass. Single-column keys only, and only up to :data:`LISTED_KEYS_MAX` keys (memory
stays bounded; a larger pass is read by ranges, as any other).
"""

from __future__ import annotations

from collections.abc import Sequence

LISTED_KEYS_MAX = 200_000


class KeyList:
    """Every key of a pass, in key order, as text (as checkpoints keep keys)."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys
        self.index = {key: i for i, key in enumerate(keys)}

    def boundaries(self, size: int) -> list[list[str]]:
        """The last key of every full batch of ``size`` keys."""
        return [[key] for key in self.keys[size - 1 :: size]]

    def between(self, after: Sequence[str] | None, upto: Sequence[str] | None) -> list[str]:
        """The keys in (after, upto]. A bound the list does not hold lies before (``after``) or past
        (``upto``) every listed key: the list was read within those bounds."""
        start = self.index[after[0]] + 1 if after is not None and after[0] in self.index else 0
        end = self.index[upto[0]] + 1 if upto is not None and upto[0] in self.index else len(self.keys)
        return self.keys[start:end]
