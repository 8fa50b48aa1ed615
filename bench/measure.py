"""The measurements of ``make bench``: the tool as a child process, and the baselines it is judged by.

Each function takes databases that already exist and returns seconds (and what it moved); building and
dropping databases is the caller's business, so every measurement starts from the same copies.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import psycopg
from psycopg import sql

from devkit import SQL_DIR
from devkit.embedded import binaries_dir
from devkit.testbed import Database

APP_TABLES = ("public.profiles", "public.financing_requests", "public.bank_profiles", "public.documents")
AUTH_TABLES = ("auth.users", "auth.identities")
# The fraction of rows a "small change" catch-up finds edited in production.
CHANGED_FRACTION = 0.001


@dataclass(frozen=True)
class SyncRun:
    """One ``sync`` child process: its JSON report, wall seconds (start-up included) and peak RSS."""

    report: dict
    seconds: float
    peak_kib: int


def sync_cli(*args: str) -> SyncRun:
    """Run ``python -m sync`` in a child process; its own peak RSS comes from ``wait4`` for that child.

    This process stays small (the scenario is built by another child), because Linux carries a parent's
    high-water mark into the children it forks.
    """
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen([sys.executable, "-m", "sync", *args, "--json"], stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if code not in (0, 3):
            raise SystemExit(f"sync {' '.join(args[:1])} failed ({code}): {err.read().strip()}")
        return SyncRun(json.loads(out.read()), seconds, usage.ru_maxrss)


def pg_dump_seconds(source: Database, empty: Database) -> float:
    """``pg_dump --data-only`` of the users, identities and app tables piped into ``psql`` of ``empty``.

    ``empty`` gets production's schema first (untimed), so the foreign keys hold as they do for the sync.
    """
    with psycopg.connect(empty.url) as conn:
        conn.execute((SQL_DIR / "scenario" / "production.sql").read_text())  # type: ignore[arg-type]
    bindir = binaries_dir()
    tables = (*AUTH_TABLES, *APP_TABLES)
    dump = [str(bindir / "pg_dump"), "--data-only", *[f"--table={t}" for t in tables], source.admin_url]
    load = [str(bindir / "psql"), "--quiet", "-v", "ON_ERROR_STOP=1", empty.admin_url]
    started = time.perf_counter()
    producer = subprocess.Popen(dump, stdout=subprocess.PIPE)
    assert producer.stdout is not None
    consumer = subprocess.Popen(
        load, stdin=producer.stdout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    producer.stdout.close()  # so pg_dump gets SIGPIPE if psql stops early
    _, load_errors = consumer.communicate()
    producer.wait()
    if producer.returncode or consumer.returncode:
        raise SystemExit(f"pg_dump | psql failed: {load_errors.strip()}")
    return time.perf_counter() - started


def _copyable_columns(conn: psycopg.Connection, table: str) -> list[str]:
    schema, name = table.split(".")
    rows = conn.execute(
        "SELECT a.attname FROM pg_attribute AS a JOIN pg_class AS c ON c.oid = a.attrelid "
        "JOIN pg_namespace AS n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s "
        "AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' ORDER BY a.attnum",
        (schema, name),
    ).fetchall()
    return [r[0] for r in rows]


def _pipe(
    reader: psycopg.Connection, query: sql.Composable, writer: psycopg.Connection, into: sql.Composable
) -> None:
    """Stream a binary ``COPY (query) TO STDOUT`` into ``COPY into FROM STDIN`` without decoding rows."""
    outgoing = sql.SQL("COPY ({}) TO STDOUT (FORMAT binary)").format(query)
    incoming = sql.SQL("COPY {} FROM STDIN (FORMAT binary)").format(into)
    with reader.cursor().copy(outgoing) as out, writer.cursor().copy(incoming) as sink:
        for data in out:
            sink.write(data)


def auth_copy_floor(source: Database, target: Database) -> tuple[float, int, int]:
    """A plain binary ``COPY`` of the production users the target lacks (by id, e-mail or phone) and their
    identities, into the target's own ``auth.users``/``auth.identities`` (indexes, triggers, FKs as they
    are). Returns seconds (the two COPYs, one transaction), users and identities copied.
    """
    with psycopg.connect(source.url) as src, psycopg.connect(target.url) as dst:
        # Three anti-joins the planner hashes (one with ORs would compare every pair).
        src.execute("CREATE TEMP TABLE known (id uuid, email text, phone text)")
        _pipe(
            dst,
            sql.SQL("SELECT id, lower(email), phone FROM auth.users"),
            src,
            sql.SQL("pg_temp.known (id, email, phone)"),
        )
        src.execute(
            "CREATE TEMP TABLE fresh AS SELECT u.id FROM auth.users AS u "
            "WHERE NOT EXISTS (SELECT FROM pg_temp.known AS k WHERE k.id = u.id) "
            "AND NOT EXISTS (SELECT FROM pg_temp.known AS k WHERE k.email = lower(u.email)) "
            "AND NOT EXISTS (SELECT FROM pg_temp.known AS k WHERE k.phone = u.phone)"
        )
        src.execute("CREATE UNIQUE INDEX ON pg_temp.fresh (id)")
        src.execute("ANALYZE pg_temp.fresh")
        started = time.perf_counter()
        for table, key in (("auth.users", "id"), ("auth.identities", "user_id")):
            columns = _copyable_columns(dst, table)
            names = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
            schema, name = table.split(".")
            query = sql.SQL(
                "SELECT {} FROM {} AS t WHERE EXISTS (SELECT FROM pg_temp.fresh AS f WHERE f.id = t.{})"
            ).format(
                sql.SQL(", ").join(sql.Identifier("t", c) for c in columns),
                sql.Identifier(schema, name),
                sql.Identifier(key),
            )
            _pipe(src, query, dst, sql.SQL("{} ({})").format(sql.Identifier(schema, name), names))
        dst.commit()
        seconds = time.perf_counter() - started
        users = src.execute("SELECT count(*) FROM pg_temp.fresh").fetchone()[0]
        identities = src.execute(
            "SELECT count(*) FROM auth.identities AS i JOIN pg_temp.fresh AS f ON f.id = i.user_id"
        ).fetchone()[0]
    return seconds, users, identities


def change_rows(source: Database) -> int:
    """Edit ``CHANGED_FRACTION`` of production's users and rows of each app table (at least one each),
    bumping ``updated_at`` as the app would; returns how many rows were edited."""
    edited = 0
    with psycopg.connect(source.url) as conn:
        for table in (*APP_TABLES, "auth.users"):
            schema, name = table.split(".")
            ident = sql.Identifier(schema, name)
            total = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(ident)).fetchone()[0]
            wanted = max(1, math.ceil(total * CHANGED_FRACTION))
            cur = conn.execute(
                sql.SQL(
                    "UPDATE {0} SET updated_at = now() WHERE id IN "
                    "(SELECT id FROM {0} ORDER BY md5(id::text) LIMIT %s)"
                ).format(ident),
                (wanted,),
            )
            edited += cur.rowcount
    return edited
