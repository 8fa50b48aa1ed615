"""The seed scenario on a server: build production and development databases, report their counts."""

from __future__ import annotations

import time
from dataclasses import dataclass

import psycopg

from sync import scenario, testbed
from sync.embedded import ensure_server

DEMO_SOURCE = "sync_demo_production"
DEMO_TARGET = "sync_demo_development"


class DemoError(RuntimeError):
    """The scenario cannot be built where it was asked to be; the message says why."""


@dataclass(frozen=True)
class DemoDatabases:
    """Where the scenario was built, and how long it took."""

    source_url: str
    target_url: str
    seconds: float


def build_on_embedded(scale: int, seed: int) -> DemoDatabases:
    """Build the scenario into fresh demo databases on the project's own server (or DATABASE_URL)."""
    server = ensure_server()
    template = testbed.supabase_template(server)
    dbs = []
    for name in (DEMO_SOURCE, DEMO_TARGET):
        testbed.drop_database(server, name)
        dbs.append(testbed.create_database(server, name, template=template.name))
    return build(dbs[0].url, dbs[1].url, scale, seed)


def build(source_url: str, target_url: str, scale: int, seed: int) -> DemoDatabases:
    """Build the scenario into two databases a user names; both must have Supabase's auth schema."""
    for side, url in (("source", source_url), ("target", target_url)):
        _check_buildable(side, url)
    started = time.perf_counter()
    data = scenario.generate(scale=scale, seed=seed)
    scenario.build_production(source_url, data)
    scenario.build_development(target_url, data)
    return DemoDatabases(source_url, target_url, time.perf_counter() - started)


def _check_buildable(side: str, url: str) -> None:
    try:
        with psycopg.connect(url, connect_timeout=10) as conn:
            auth, profiles = conn.execute(
                "SELECT to_regclass('auth.users'), to_regclass('public.profiles')"
            ).fetchone()  # type: ignore[misc]
    except psycopg.OperationalError as exc:
        raise DemoError(f"Cannot connect to the {side} database: {_first_line(exc)}") from None
    if auth is None:
        raise DemoError(
            f"The {side} database has no auth.users: build the scenario into a Supabase database."
        )
    if profiles is not None:
        raise DemoError(f"The {side} database already has public.profiles: use an empty Supabase database.")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
