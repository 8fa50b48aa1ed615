"""A PgBouncer in front of the test server, started by the test that needs it (Debian's binary).

Nothing is installed: when ``/usr/sbin/pgbouncer`` is absent the tests that need it are skipped
(``apt-get install pgbouncer`` provides it). It listens on a free, non-standard port on the loopback.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

PGBOUNCER = Path("/usr/sbin/pgbouncer")
USERS = {"postgres": "postgres", "supabase_admin": "supabase_admin"}

needs_pgbouncer = pytest.mark.skipif(
    not PGBOUNCER.exists(),
    reason="PgBouncer is not installed (/usr/sbin/pgbouncer; `apt-get install pgbouncer` provides it)",
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def pgbouncer(server_url: str, pool_mode: str) -> Iterator[int]:
    """Run PgBouncer in ``pool_mode`` in front of the server of ``server_url``; yields its port."""
    server = psycopg.conninfo.conninfo_to_dict(server_url)
    port = _free_port()
    home = Path(tempfile.mkdtemp(prefix="sync-pgbouncer-"))
    (home / "users.txt").write_text("".join(f'"{u}" "{p}"\n' for u, p in USERS.items()))
    settings = {
        "listen_addr": "127.0.0.1",
        "listen_port": port,
        "unix_socket_dir": "",
        "auth_type": "plain",
        "auth_file": home / "users.txt",
        "pool_mode": pool_mode,
        "default_pool_size": 4,
        "max_client_conn": 200,
        "logfile": home / "pgbouncer.log",
        "pidfile": home / "pgbouncer.pid",
        "ignore_startup_parameters": "extra_float_digits,statement_timeout",
    }
    if os.geteuid() == 0:  # PgBouncer refuses to run as root: it switches to an unprivileged user
        user = pwd.getpwnam("postgres" if _has_user("postgres") else "nobody")
        settings["user"] = user.pw_name
        for path in (home, *home.iterdir()):
            os.chown(path, user.pw_uid, user.pw_gid)
    config = home / "pgbouncer.ini"
    config.write_text(
        f"[databases]\n* = host={server.get('host', '127.0.0.1')} port={server.get('port', 5432)}\n"
        "[pgbouncer]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items())
    )
    process = subprocess.Popen(
        [str(PGBOUNCER), str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        _wait_for(port, process, home)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(home, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _wait_for(port: int, process: subprocess.Popen[bytes], home: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log = (home / "pgbouncer.log").read_text() if (home / "pgbouncer.log").exists() else ""
            raise RuntimeError(
                f"pgbouncer exited: {process.stderr.read().decode() if process.stderr else ''}{log}"
            )
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("pgbouncer did not start listening within 10 s")


def through(url: str, port: int) -> str:
    """``url`` with its host and port replaced by the pooler's."""
    return psycopg.conninfo.make_conninfo(url, host="127.0.0.1", port=str(port))
