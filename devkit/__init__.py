"""The development kit: the seed scenario, the demo, Supabase-shaped test databases and the embedded server.

Used by ``sync demo``, the tests and the benchmarks, from a checkout of the project; it is not part of
the tool's wheel, and the tool never imports it except inside ``sync demo``.
"""

from __future__ import annotations

from pathlib import Path

SQL_DIR = Path(__file__).resolve().parent / "sql"
"""Supabase-shaped roles, auth and storage (``supabase/``) and the seed's app schema (``scenario/``)."""
