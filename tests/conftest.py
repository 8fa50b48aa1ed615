"""Test harness: a real PostgreSQL (embedded, or DATABASE_URL), fresh databases for every test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devkit import SQL_DIR, testbed
from devkit.embedded import Server, dedicated_cluster, ensure_server


@pytest.fixture(scope="session")
def server() -> Server:
    """The PostgreSQL server of this test session, with the Supabase roles in place.

    Tests running side by side (``make test``) each get a server of their own: catch-ups find changes
    by transaction id, and one server's ids are shared by every database on it, so a transaction held
    open by one test would widen what another test's catch-up reads.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker and not os.environ.get("DATABASE_URL"):
        srv = dedicated_cluster(f"test-{worker}").ensure_running()
    else:
        srv = ensure_server()
    testbed.prepare_cluster(srv)
    return srv


@pytest.fixture(scope="session")
def supabase_template(server: Server) -> testbed.Database:
    return testbed.supabase_template(server)


def _fresh(server: Server, template: str) -> Iterator[testbed.Database]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    db = testbed.create_database(server, name, template=template)
    try:
        yield db
    finally:
        testbed.drop_database(server, name)


@pytest.fixture
def supabase_db(server: Server, supabase_template: testbed.Database) -> Iterator[testbed.Database]:
    """A fresh, empty Supabase-shaped database."""
    yield from _fresh(server, supabase_template.name)


@pytest.fixture
def make_db(server: Server, supabase_template: testbed.Database):
    """Factory of fresh databases copied from a template (default: the empty Supabase one)."""
    created: list[str] = []

    def make(template: str | None = None) -> testbed.Database:
        name = f"t_{uuid.uuid4().hex[:12]}"
        created.append(name)
        return testbed.create_database(server, name, template=template or supabase_template.name)

    yield make
    for name in created:
        testbed.drop_database(server, name)


@pytest.fixture(scope="session")
def seed_templates(server: Server, supabase_template: testbed.Database) -> tuple[str, str]:
    """Seed scenario templates at scale 1: (production, development); rebuilt when their code changes."""
    from devkit import scenario

    digest = testbed.fingerprint(SQL_DIR, Path(scenario.__file__))
    data = None

    def build(side: str):
        def run(db: testbed.Database) -> None:
            nonlocal data
            data = data or scenario.generate()
            if side == "production":
                scenario.build_production(db.url, data)
            else:
                scenario.build_development(db.url, data)

        return run

    # The digest is in the name: checkouts with another scenario share the server without rebuilding
    # each other's templates.
    prod = testbed.ensure_template(server, f"sync_tpl_seed_production_{digest}", digest, build("production"))
    dev = testbed.ensure_template(server, f"sync_tpl_seed_development_{digest}", digest, build("development"))
    return prod.name, dev.name


@pytest.fixture
def seed_dbs(make_db, seed_templates: tuple[str, str]) -> tuple[testbed.Database, testbed.Database]:
    """Fresh copies of the seed scenario: (production = source, development = target)."""
    return make_db(seed_templates[0]), make_db(seed_templates[1])
