"""SQL text built from catalog and mapping names: identifiers quoted, every value a bound parameter."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def ident(name: str) -> str:
    """A quoted identifier; embedded double quotes are doubled."""
    return '"' + name.replace('"', '""') + '"'


def split_name(qualified: str) -> tuple[str, str]:
    """``"schema.table"`` → ``("schema", "table")``; the schema is everything before the first dot."""
    schema, _, table = qualified.partition(".")
    if not table:
        return "public", schema
    return schema, table


def table_ident(qualified: str) -> str:
    """A quoted ``schema.table``."""
    schema, table = split_name(qualified)
    return f"{ident(schema)}.{ident(table)}"


def column_list(names: Iterable[str], prefix: str = "") -> str:
    """``a, b`` quoted, each optionally prefixed by a table alias (``s.a, s.b``)."""
    return ", ".join(f"{prefix}{ident(n)}" for n in names)


def row_of(names: Iterable[str], prefix: str = "") -> str:
    """A row constructor ``ROW(s.a, s.b)`` for IS DISTINCT FROM comparisons (works for one column too)."""
    return f"ROW({column_list(names, prefix)})"


class Params:
    """The values bound to one statement: ``$1``, ``$2``, … in the order first used, each value once.

    SQL is composed from fragments (a window, a closure, a key range); each fragment binds its values
    here and pastes only the placeholder, and the statement runs with :attr:`values` as its arguments.
    """

    def __init__(self) -> None:
        self.values: list[Any] = []
        self._slots: dict[tuple[str, Any], str] = {}

    def bind(self, value: Any, sql_type: str) -> str:
        """The placeholder for ``value`` as ``sql_type`` (``$2::timestamptz``); the same value reuses it."""
        key = (sql_type, tuple(value) if isinstance(value, list) else value)
        if key not in self._slots:
            self.values.append(value)
            self._slots[key] = f"${len(self.values)}::{sql_type}"
        return self._slots[key]
