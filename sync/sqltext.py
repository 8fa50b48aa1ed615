"""SQL text built from catalog and mapping names: identifiers quoted, every value a bound parameter, or,
where the protocol binds none (``COPY (query) TO STDOUT``, several statements sent together), a literal
the client renders itself."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, overload
from uuid import UUID

if TYPE_CHECKING:
    import asyncpg


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


# A placeholder, or text where ``$n`` is not one and is left as written: a quoted identifier (a column may
# be named ``a$1``), a string, an escape string, a comment.
_PLACEHOLDER = re.compile(
    r"""
      "(?:[^"]|"")*"
    | (?<![\w$])[Ee]'(?:[^'\\]|\\.|'')*'
    | '(?:[^']|'')*'
    | --[^\n]*
    | /\*.*?\*/
    | (?<![\w$])\$(\d+)\b
    """,
    re.VERBOSE | re.DOTALL,
)


def inline(query: str, args: Sequence[Any]) -> str:
    """``query`` with each ``$n`` replaced by the literal of ``args[n - 1]``, in one pass (a literal's own
    text is never read again; a ``$n`` inside a quoted name, a string or a comment is not a placeholder).
    Rendered here, without a round trip to ask the server: the statement's ``::type`` casts that follow
    each placeholder give the literal its type, as for a bound value.
    """
    if not args:
        return query
    literals = [literal(a) for a in args]
    return _PLACEHOLDER.sub(lambda m: m[0] if m[1] is None else literals[int(m[1]) - 1], query)


class PackedIds(Sequence[UUID]):
    """Ids packed 16 bytes each, as the target hands many of them over: a sequence of UUIDs made one at a
    time when read, and an array literal rendered from the bytes at once (10k ids in about a millisecond,
    where UUID objects take tens)."""

    __slots__ = ("packed",)

    def __init__(self, packed: bytes) -> None:
        if len(packed) % 16:
            raise ValueError("packed ids come 16 bytes each")
        self.packed = packed

    def __len__(self) -> int:
        return len(self.packed) // 16

    @overload
    def __getitem__(self, index: int) -> UUID: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[UUID]: ...
    def __getitem__(self, index: int | slice) -> UUID | Sequence[UUID]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("id index out of range")
        return UUID(bytes=self.packed[16 * index : 16 * index + 16])

    def __iter__(self) -> Iterator[UUID]:
        packed = self.packed
        return (UUID(bytes=packed[i : i + 16]) for i in range(0, len(packed), 16))

    def __repr__(self) -> str:
        return f"PackedIds({len(self)} ids)"

    def array(self) -> str:
        """The ids as the text of a ``uuid[]`` (hex digits need no quotes)."""
        digits = self.packed.hex()
        return "{" + ",".join([digits[i : i + 32] for i in range(0, len(digits), 32)]) + "}"


def literal(value: Any) -> str:
    """A quoted SQL literal of ``value`` (an escape string, so read alike whatever
    ``standard_conforming_strings`` says), or ``NULL``; a list or tuple becomes an array literal."""
    if value is None:
        return "NULL"
    if isinstance(value, PackedIds):
        return "E'" + value.array() + "'"
    if isinstance(value, list | tuple):
        text = "{" + ",".join(_array_element(v) for v in value) + "}"
    else:
        text = _text(value)
    return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


def _array_element(value: Any) -> str:
    if value is None:
        return "NULL"
    # The many ids of a group, rendered in a few ms: hex digits and a minus sign need no quotes.
    if isinstance(value, UUID):
        return value.hex
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return '"' + _text(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _text(value: Any) -> str:
    """The text PostgreSQL reads as this value (a naive datetime is local time, as the driver takes it)."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int | Decimal | UUID):
        text = str(value)
    elif isinstance(value, datetime):
        text = value.astimezone().isoformat() if value.tzinfo is None else value.isoformat()
    elif isinstance(value, date):
        text = value.isoformat()
    else:
        raise TypeError(f"no SQL literal for a {type(value).__name__}")
    if "\x00" in text:
        raise ValueError("a SQL literal cannot hold a NUL character")
    return text


class Pending:
    """Statements whose results are not needed, kept to be sent together: one round trip for all rather
    than one or two each (a statement new to a connection is prepared first). Each is rendered with its
    literals (:func:`inline`); they run in order, inside the caller's transaction. It stands in for the
    connection where a step only executes statements.
    """

    def __init__(self) -> None:
        self._statements: list[str] = []

    async def execute(self, query: str, *args: Any) -> None:
        """Keep ``query`` (with ``args`` as its ``$n``) for :meth:`send`."""
        self._statements.append(inline(query, args))

    async def send(self, conn: asyncpg.Connection) -> None:
        """Execute the statements kept so far on ``conn``, in one round trip."""
        statements, self._statements = self._statements, []
        if statements:
            await conn.execute(";\n".join(statements))
