"""Supabase-shaped databases on a development server: roles, the auth schema, and fast copies.

Used by the demo, the tests and the benchmarks. Databases are owned by the non-superuser
``postgres`` login (as on a hosted project) and built once into templates; every further database
is a ``CREATE DATABASE … TEMPLATE`` copy, which takes a fraction of a second.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from devkit import SQL_DIR
from devkit.embedded import Server

APP_ROLE = "postgres"
APP_PASSWORD = "postgres"


@dataclass(frozen=True)
class Database:
    """One database of the development server, with URLs for the superuser and for ``postgres``."""

    name: str
    admin_url: str
    url: str


def database(server: Server, name: str) -> Database:
    """Describe database ``name`` on ``server``."""
    return Database(
        name=name,
        admin_url=server.database_url(name),
        url=server.database_url(name, APP_ROLE, APP_PASSWORD),
    )


def run_sql_file(url: str, path: Path) -> None:
    """Execute one SQL script (plain SQL, no psql meta-commands) in one transaction."""
    with psycopg.connect(url, autocommit=False) as conn:
        conn.execute(path.read_text())  # type: ignore[arg-type]


@contextmanager
def _exclusive(server: Server, what: str) -> Iterator[None]:
    """Hold a server-wide advisory lock named ``what``: test processes running side by side build once."""
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(hashtext(%s))", (f"devkit:{what}",))
        try:
            yield
        finally:
            conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (f"devkit:{what}",))


def prepare_cluster(server: Server) -> None:
    """Create the cluster-wide Supabase roles (idempotent)."""
    with _exclusive(server, "roles"):
        run_sql_file(server.url, SQL_DIR / "supabase" / "roles.sql")


def create_database(server: Server, name: str, template: str | None = None) -> Database:
    """Create ``name`` owned by ``postgres``; a copy of ``template`` when given, else Supabase-shaped."""
    with psycopg.connect(server.url, autocommit=True) as conn:
        query = sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(APP_ROLE))
        if template is not None:
            query = sql.SQL("{} TEMPLATE {} STRATEGY FILE_COPY").format(query, sql.Identifier(template))
        conn.execute(query)
    db = database(server, name)
    if template is None:
        run_sql_file(db.admin_url, SQL_DIR / "supabase" / "schema.sql")
    return db


def drop_database(server: Server, name: str) -> None:
    """Drop ``name`` if it exists, disconnecting its sessions."""
    with psycopg.connect(server.url, autocommit=True) as conn:
        template = conn.execute(
            "SELECT datistemplate FROM pg_database WHERE datname = %s", (name,)
        ).fetchone()
        if template and template[0]:
            conn.execute(sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE false").format(sql.Identifier(name)))
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def fingerprint(*parts: str | bytes | Path) -> str:
    """A short digest of files and strings: a template is rebuilt when what built it changed."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            for file in sorted(part.rglob("*") if part.is_dir() else [part]):
                if file.is_file() and "__pycache__" not in file.parts:
                    digest.update(file.name.encode())
                    digest.update(file.read_bytes())
        else:
            digest.update(part.encode() if isinstance(part, str) else part)
    return digest.hexdigest()[:16]


def ensure_template(server: Server, name: str, digest: str, build: Callable[[Database], None]) -> Database:
    """Return template ``name``, (re)building it with ``build`` when its recorded digest differs."""
    with _exclusive(server, name):
        return _ensure_template(server, name, digest, build)


def _ensure_template(server: Server, name: str, digest: str, build: Callable[[Database], None]) -> Database:
    with psycopg.connect(server.url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s", (name,)
        ).fetchone()
    if row is not None and row[0] == digest:
        return database(server, name)
    drop_database(server, name)
    db = create_database(server, name)
    build(db)
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name), sql.Literal(digest))
        )
        conn.execute(sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE true").format(sql.Identifier(name)))
    return db


def supabase_template(server: Server) -> Database:
    """The template of an empty Supabase-shaped database (roles, auth, storage)."""
    prepare_cluster(server)
    digest = fingerprint(SQL_DIR / "supabase")
    return ensure_template(server, "sync_tpl_supabase", digest, lambda db: None)
