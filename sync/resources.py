"""Files the package ships: SQL scripts and mapping examples (inside the package when installed)."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def sql_dir() -> Path:
    """The folder holding the project's SQL files (installed inside the package, or beside it)."""
    packaged = _HERE / "sql"
    return packaged if packaged.is_dir() else _HERE.parent / "sql"
