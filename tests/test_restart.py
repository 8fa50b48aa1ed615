"""A server that restarts or fails over for a few seconds: the run rides through it, at start too.

These stories stop and start a server of their own, so the one the other tests share is never touched.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from queries import execute, fetch
from test_resume import finish, wait_until

from devkit.embedded import LocalCluster, Server, dedicated_cluster

ROWS = 20_000
TABLE = "CREATE TABLE notes (id uuid PRIMARY KEY, body text NOT NULL, updated_at timestamptz NOT NULL)"
CHECKSUM = "SELECT count(*), md5(string_agg(id::text || body, ',' ORDER BY id)) FROM notes"


@pytest.fixture(scope="module")
def restartable() -> Iterator[tuple[LocalCluster, Server]]:
    cluster = dedicated_cluster("restart")
    server = cluster.ensure_running()
    yield cluster, server
    cluster.stop()


@pytest.fixture
def databases(restartable: tuple[LocalCluster, Server]) -> tuple[str, str]:
    """A source with ROWS notes and an empty target with the same table, on the restartable server."""
    _, server = restartable
    urls = []
    for name in ("restart_source", "restart_target"):
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            conn.execute(f"CREATE DATABASE {name}")
        url = server.database_url(name)
        execute(url, TABLE)
        urls.append(url)
    execute(
        urls[0],
        "INSERT INTO notes SELECT gen_random_uuid(), md5(g::text), '2025-01-01' "
        "FROM generate_series(1, %s) AS g",
        ROWS,
    )
    return urls[0], urls[1]


def start_run(source: str, target: str, mapping: Path) -> subprocess.Popen[str]:
    args = ["run", "--since", "2024-11-18", "--skip-auth", "--quiet", "--batch-size", "100", "--jobs", "1"]
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sync",
            *args,
            "--source",
            source,
            "--target",
            target,
            "--mapping",
            str(mapping),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def restart(cluster: LocalCluster, server: Server, pause: float) -> None:
    """Stop the server (sessions cut, as in a restart or failover), wait, start it on the same port."""
    port = psycopg.conninfo.conninfo_to_dict(server.url)["port"]
    cluster.stop()
    time.sleep(pause)
    cluster.start(int(port))


def test_a_two_second_restart_mid_run_and_one_at_start_are_ridden_through(
    restartable: tuple[LocalCluster, Server], databases: tuple[str, str], tmp_path: Path
):
    cluster, server = restartable
    source, target = databases
    mapping = tmp_path / "notes.toml"
    mapping.write_text("[sync]\n")

    run = start_run(source, target, mapping)
    assert wait_until(target, "SELECT EXISTS (SELECT 1 FROM _sync.checkpoints WHERE rows_done >= 2000)", run)
    restart(cluster, server, pause=2)
    code, _, err = finish(run)
    assert code == 0, err
    assert "retrying" in err, "the restart was met and ridden through"
    assert fetch(target, CHECKSUM) == fetch(source, CHECKSUM)
    assert fetch(target, "SELECT count(*) FROM _sync.runs WHERE status = 'succeeded'") == [(1,)]

    # The server is down when the next run starts, and back two seconds later.
    execute(
        source,
        "UPDATE notes SET body = 'edited', updated_at = now() WHERE id IN (SELECT id FROM notes LIMIT 10)",
    )
    cluster.stop()
    run = start_run(source, target, mapping)
    assert run.stderr is not None
    refused = run.stderr.readline()  # the run's first word: it met the stopped server
    time.sleep(2)
    cluster.start(int(psycopg.conninfo.conninfo_to_dict(server.url)["port"]))
    code, _, err = finish(run)
    assert code == 0, refused + err
    assert "connecting to the source" in refused and "retrying" in refused
    assert fetch(target, CHECKSUM) == fetch(source, CHECKSUM)
