"""The project's own PostgreSQL: found or started with no manual step, clear errors otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from devkit import embedded


def run_module(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-m", "devkit.embedded", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
    )


def test_the_server_is_reused_across_runs(server):
    first, second = embedded.ensure_server(), embedded.ensure_server()
    assert first.url == second.url
    with psycopg.connect(first.url) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (embedded.SUPERUSER,)


def test_the_engine_role_is_shaped_like_hosted_supabase_postgres(server):
    with psycopg.connect(server.url) as conn:
        row = conn.execute(
            "SELECT rolsuper, rolbypassrls, rolcreatedb FROM pg_roles WHERE rolname = 'postgres'"
        )
        assert row.fetchone() == (False, True, True)


def test_a_bad_database_url_is_one_clear_line_and_a_non_zero_exit():
    result = run_module(DATABASE_URL="postgresql://nobody:secret-pw@127.0.0.1:1/nowhere")
    assert result.returncode == 1
    assert result.stderr.startswith("error: Cannot connect to the server named by DATABASE_URL")
    assert "Traceback" not in result.stderr and "secret-pw" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_unknown_postgres_version_is_refused_clearly():
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "devkit.embedded"],
        capture_output=True,
        text=True,
        env={**env, "SYNC_PG": "13"},
        timeout=60,
    )
    assert result.returncode == 1
    assert "SYNC_PG='13' is not supported" in result.stderr


def test_no_wheel_and_no_binaries_says_what_to_do(monkeypatch):
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("SYNC_PG", raising=False)
    monkeypatch.setattr(embedded, "_wheel_bindir", lambda: None)
    with pytest.raises(embedded.EmbeddedError, match=r"set DATABASE_URL .* or install the embedded one"):
        embedded.ensure_server()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand a folder to another user")
def test_a_data_folder_owned_by_someone_else_is_refused(tmp_path: Path):
    home = tmp_path / "pg"
    (home / "data").mkdir(parents=True)
    os.chown(home, 54321, 54321)
    bindir = embedded._wheel_bindir() or embedded.SYSTEM_PG15
    with pytest.raises(embedded.EmbeddedError, match=r"belongs to .*not to the user this server runs as"):
        embedded.LocalCluster(bindir, home).ensure_running()
