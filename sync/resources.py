"""Files the tool ships beside its code: the ``_sync`` schema and the example mapping."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def sql_dir() -> Path:
    """The folder holding the tool's SQL (``state.sql``, the ``_sync`` schema)."""
    return _HERE / "sql"


def example_mapping() -> Path:
    """The seed scenario's mapping, commented to teach the format.

    Inside the package when installed from a wheel, ``mappings/sync.toml`` beside it in a checkout.
    """
    packaged = _HERE / "mappings" / "sync.toml"
    return packaged if packaged.is_file() else _HERE.parent / "mappings" / "sync.toml"
