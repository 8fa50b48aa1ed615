"""Test harness: a real PostgreSQL (embedded, or DATABASE_URL), fresh databases for every test."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from admin_api_import import FirstApiImport, import_through_the_api

try:
    from _pytest.nodeid import NodeId
except ImportError:  # before pytest 9, pytest-xdist writes the group into the node id itself
    NodeId = None

from devkit import SQL_DIR, scenario, testbed
from devkit.embedded import Server, dedicated_cluster, ensure_server


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``xdist_group`` run on one worker under ``--dist loadgroup``, as the mark promises.

    pytest-xdist finds a test's group in an ``@group`` suffix of its node id and writes that suffix
    into ``item._nodeid``, which pytest 9 no longer reads (the id lives in ``item._id``): without this,
    the tests of a group spread over the workers and each worker builds what the group shares.
    """
    if NodeId is None or not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        groups = sorted(
            {
                str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                for m in item.iter_markers("xdist_group")
            }
        )
        if groups and "@" not in item.nodeid:
            item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(groups)}")


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


@contextlib.contextmanager
def _fresh(server: Server, template: str) -> Iterator[testbed.Database]:
    """A new database copied from ``template``, dropped on leaving."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    db = testbed.create_database(server, name, template=template)
    try:
        yield db
    finally:
        testbed.drop_database(server, name)


@pytest.fixture
def supabase_db(server: Server, supabase_template: testbed.Database) -> Iterator[testbed.Database]:
    """A fresh, empty Supabase-shaped database."""
    with _fresh(server, supabase_template.name) as db:
        yield db


@pytest.fixture
def make_db(server: Server, supabase_template: testbed.Database):
    """Factory of fresh databases copied from a template (default: the empty Supabase one)."""
    with contextlib.ExitStack() as made:

        def make(template: str | None = None) -> testbed.Database:
            return made.enter_context(_fresh(server, template or supabase_template.name))

        yield make


@pytest.fixture(scope="session")
def seed() -> scenario.Scenario:
    """The seed scenario's rows, the same ones the seed databases were built from (drawn once per test
    process: the draw hashes passwords; tests only read it)."""
    return scenario.generate()


@pytest.fixture(scope="session")
def seed_templates(
    server: Server, supabase_template: testbed.Database, request: pytest.FixtureRequest
) -> tuple[str, str]:
    """Seed scenario templates at scale 1: (production, development); rebuilt when their code changes."""
    digest = testbed.fingerprint(SQL_DIR, Path(scenario.__file__))

    def build(side: str):
        def run(db: testbed.Database) -> None:
            data = request.getfixturevalue("seed")
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


@pytest.fixture(scope="session")
def first_api_import(server: Server, seed_templates: tuple[str, str]) -> Iterator[FirstApiImport]:
    """One admin-API import of the seed per test process, for the tests that start from its result
    (marked ``xdist_group("first-api-import")``, so one worker runs it once for all of them)."""
    with _fresh(server, seed_templates[0]) as source, _fresh(server, seed_templates[1]) as target:
        yield asyncio.run(import_through_the_api(source, target))


@pytest.fixture
def api_imported_dbs(make_db, first_api_import: FirstApiImport) -> tuple[testbed.Database, testbed.Database]:
    """Fresh copies of (production, development) as the first admin-API import left them."""
    return make_db(first_api_import.source), make_db(first_api_import.target)
