"""Small synchronous SQL calls the tests use to set up and inspect databases."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import psycopg

from sync.auth import AuthOptions
from sync.connect import Endpoint, Side
from sync.mapping import load_mapping
from sync.run import RunOptions, auth_import, run_sync

SEED_MAPPING = Path(__file__).resolve().parent.parent / "mappings" / "sync.toml"
"""The seed scenario's mapping, as shipped."""


def fetch(url: str, sql: str, *params: object) -> list[tuple]:
    """All rows of ``sql`` (``%s`` placeholders only when ``params`` are given)."""
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params or None).fetchall()  # type: ignore[arg-type]


def execute(url: str, sql: str, *params: object) -> None:
    """Run ``sql`` (possibly several statements when there are no ``params``) and commit."""
    with psycopg.connect(url) as conn:
        conn.execute(sql, params or None)  # type: ignore[arg-type]


SEED_APP_TABLES = ("public.profiles", "public.financing_requests", "public.bank_profiles", "public.documents")
"""The seed scenario's application tables the mapping copies."""


def seed_sync(source, target, **options):  # type: ignore[no-untyped-def]
    """One run of the engine between two test databases with the seed mapping (direct auth import);
    ``options`` are :class:`~sync.run.RunOptions`' own."""
    return asyncio.run(
        run_sync(
            Endpoint.parse(Side.SOURCE, source.url),
            Endpoint.parse(Side.TARGET, target.url),
            load_mapping(SEED_MAPPING),
            RunOptions(**options),
            auth_stage=auth_import(AuthOptions()),
        )
    )


def seed_command(command: str, source, target, *extra: str) -> list[str]:  # type: ignore[no-untyped-def]
    """``sync COMMAND`` between two test databases with the seed mapping, plus ``extra``."""
    return [command, "--source", source.url, "--target", target.url, "--mapping", str(SEED_MAPPING), *extra]


def seed_run_args(source, target, *extra: str) -> list[str]:  # type: ignore[no-untyped-def]
    """``sync run --since 2024-11-18`` between two test databases with the seed mapping, plus ``extra``."""
    return seed_command("run", source, target, "--since", "2024-11-18", *extra)


def ctrl_c_heard() -> None:
    """``preexec_fn`` of a child the test sends Ctrl-C (SIGINT): it hears it as at a terminal, even when
    the test runner was started with SIGINT ignored (a background job inherits that, and Python then
    leaves it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
