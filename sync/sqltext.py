"""Quoting for SQL text built from catalog and mapping names: identifiers and literals, never pasted raw."""

from __future__ import annotations

from collections.abc import Iterable


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


def literal(value: str) -> str:
    """A quoted string literal (standard_conforming_strings is on in every supported server)."""
    return "'" + value.replace("'", "''") + "'"


def column_list(names: Iterable[str], prefix: str = "") -> str:
    """``a, b`` quoted, each optionally prefixed by a table alias (``s.a, s.b``)."""
    return ", ".join(f"{prefix}{ident(n)}" for n in names)


def row_of(names: Iterable[str], prefix: str = "") -> str:
    """A row constructor ``ROW(s.a, s.b)`` for IS DISTINCT FROM comparisons (works for one column too)."""
    return f"ROW({column_list(names, prefix)})"
