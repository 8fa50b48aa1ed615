"""A transaction-mode pooler is known by how it behaves, on any port.

PgBouncer (Debian's binary, started here in transaction mode on a free port) stands in front of the
test server: read through it, the source works without prepared statements; as the target it is
refused before anything is written, with one line saying to use the session port.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from pgbouncer import needs_pgbouncer, pgbouncer, through
from queries import execute, fetch
from unchanged import unchanged

from sync.cli import main
from sync.connect import Endpoint, PoolMode, Side, detect_pool_mode

pytestmark = needs_pgbouncer

NOTES = """
CREATE TABLE public.notes (
    id uuid PRIMARY KEY,
    user_id uuid REFERENCES auth.users (id),
    body text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
"""


@pytest.fixture
def pair(make_db, tmp_path):
    source, target = make_db(), make_db()
    for db in (source, target):
        execute(db.admin_url, NOTES)
    for n in range(30):
        user = uuid.uuid4()
        execute(
            source.admin_url,
            "INSERT INTO auth.users (id, email, encrypted_password, created_at, updated_at) "
            "VALUES (%s, %s, '', now(), now())",
            user,
            f"user{n}@example.com",
        )
        execute(
            source.admin_url,
            "INSERT INTO public.notes (id, user_id, body) VALUES (%s, %s, 'hola')",
            uuid.uuid4(),
            user,
        )
    mapping = tmp_path / "sync.toml"
    mapping.write_text("# defaults\n")
    return source, target, mapping


def mode_of(url: str) -> PoolMode:
    return asyncio.run(detect_pool_mode(Endpoint.parse(Side.SOURCE, url))).mode


def run_since_2024(source_url: str, target_url: str, mapping: Path) -> Result:
    """``sync run --since 2024-01-01`` between the two URLs with ``mapping``, in process."""
    return CliRunner().invoke(
        main,
        [
            "run",
            "--since",
            "2024-01-01",
            "--source",
            source_url,
            "--target",
            target_url,
            "--mapping",
            str(mapping),
        ],
    )


def test_a_transaction_pooler_on_any_port_is_recognised_and_a_session_pooler_is_not(server, supabase_db):
    assert mode_of(supabase_db.url) is PoolMode.DIRECT
    with pgbouncer(server.url, "transaction") as port:
        assert port != 6543
        assert mode_of(through(supabase_db.url, port)) is PoolMode.TRANSACTION
    with pgbouncer(server.url, "session") as port:
        assert mode_of(through(supabase_db.url, port)) is PoolMode.DIRECT


def test_a_source_behind_a_transaction_pooler_is_read_without_prepared_statements(server, pair):
    source, target, mapping = pair
    with pgbouncer(server.url, "transaction") as port:
        pooled = through(source.url, port)
        plan = CliRunner().invoke(
            main, ["plan", "--source", pooled, "--target", target.url, "--mapping", str(mapping)]
        )
        assert plan.exit_code == 0, plan.output
        assert f"source: postgres@127.0.0.1:{port}/{source.name} (PostgreSQL" in plan.output
        assert ", transaction)" in plan.output
        run = run_since_2024(pooled, target.url, mapping)
    assert run.exit_code == 0, run.output
    assert fetch(target.url, "SELECT count(*) FROM public.notes")[0][0] == 30
    assert fetch(target.url, "SELECT count(*) FROM auth.users")[0][0] == 30


def test_a_target_behind_a_transaction_pooler_is_refused_and_leaves_no_lock_behind(server, pair):
    source, target, mapping = pair
    with pgbouncer(server.url, "transaction") as port:
        pooled = through(target.url, port)
        with unchanged(source, target):
            result = run_since_2024(source.url, pooled, mapping)
        assert result.exit_code == 2, result.output
        line = result.stderr.strip()
        assert line.startswith("error: The target ") and len(line.splitlines()) == 1, result.stderr
        assert (
            "transaction-mode pooler, which cannot hold the run lock: use the pooler's session port" in line
        )
        assert "pw" not in line and "postgres:postgres" not in line
        # The pooler is still up, and a direct run is not told that another sync holds the lock.
        direct = run_since_2024(source.url, target.url, mapping)
    assert direct.exit_code == 0, direct.output
