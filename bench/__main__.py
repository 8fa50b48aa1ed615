"""``make bench``: the seed scenario at a scale, synced end to end, timed; pg_dump for comparison.

    python -m bench [--scale 10] [--jobs 4] [--batch-size 5000]

Prints the full run (rows/s per table, total time, the tool's peak memory), a catch-up with 50 new
and 20 edited production rows, a no-op catch-up, and the time of ``pg_dump --data-only`` of the same
tables piped into ``psql`` (into an empty copy of production's schema) on the same server.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from devkit import SQL_DIR, testbed
from devkit.embedded import binaries_dir, ensure_server

TABLES = ("public.profiles", "public.financing_requests", "public.bank_profiles", "public.documents")


def sync_cli(*args: str) -> tuple[dict, float, int]:
    """Run ``python -m sync`` in a child process; return its JSON report, seconds and its own peak RSS (KiB).

    The peak comes from ``wait4`` for that child alone. This process stays small (the scenario is built
    by another child), because Linux carries a parent's high-water mark into the children it forks.
    """
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(
            [sys.executable, "-m", "sync", *args, "--json"], stdout=out, stderr=err, text=True
        )
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        if child.returncode not in (0, 3):
            raise SystemExit(f"sync {' '.join(args[:1])} failed ({child.returncode}): {err.read().strip()}")
        return json.loads(out.read()), seconds, usage.ru_maxrss


def pg_dump_seconds(server, source: testbed.Database) -> float:
    """``pg_dump --data-only`` of the users and app tables piped into ``psql`` of an empty production schema.

    The auth tables go too, so the copy is the same work the sync does (and the foreign keys hold).
    """
    empty = testbed.create_database(server, f"bench_dump_{os.getpid()}", template=None)
    try:
        with psycopg.connect(empty.url) as conn:
            conn.execute((SQL_DIR / "scenario" / "production.sql").read_text())  # type: ignore[arg-type]
        bindir = binaries_dir()
        tables = ("auth.users", "auth.identities", *TABLES)
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
    finally:
        testbed.drop_database(server, empty.name)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=5000)
    args = parser.parse_args()

    server = ensure_server()
    template = testbed.supabase_template(server)
    names = (f"bench_source_{args.scale}", f"bench_target_{args.scale}")
    for name in names:
        testbed.drop_database(server, name)
    source, target = (testbed.create_database(server, n, template=template.name) for n in names)
    started = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "sync",
            "demo",
            "--source",
            source.url,
            "--target",
            target.url,
            "--scale",
            str(args.scale),
            "--no-sync",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    print(f"scenario at scale {args.scale} built in {time.perf_counter() - started:.1f} s")

    common = [
        "--source",
        source.url,
        "--target",
        target.url,
        "--jobs",
        str(args.jobs),
        "--batch-size",
        str(args.batch_size),
        "--mapping",
        str(Path("mappings/sync.toml")),
    ]
    full, seconds, peak = sync_cli("run", "--since", "2024-11-18", *common)
    print(f"\nfull run: {seconds:.1f} s wall, peak memory {peak / 1024:.0f} MiB")
    users = full.get("auth") or {}
    print(f"  auth: {users.get('created', 0)} users created in {users.get('seconds', 0):.1f} s")
    total = 0
    for table in full["tables"]:
        rate = table["read"] / table["seconds"] if table["seconds"] else 0
        total += table["read"]
        print(
            f"  {table['table']:<28} {table['read']:>8} rows  {table['seconds']:6.2f} s  {rate:9.0f} rows/s"
        )
    print(f"  all tables: {total} rows")

    with psycopg.connect(source.url) as conn:
        conn.execute(
            "INSERT INTO public.financing_requests (profile_id, amount, term_months, status, created_at, "
            "updated_at) SELECT id, 1000, 12, 'draft', now(), now() FROM public.profiles "
            "ORDER BY id LIMIT 50"
        )
        conn.execute(
            "UPDATE public.bank_profiles SET monthly_income = monthly_income + 1, updated_at = now() "
            "WHERE id IN (SELECT id FROM public.bank_profiles ORDER BY id LIMIT 20)"
        )
    catch_up, seconds, _ = sync_cli("run", *common)
    written = sum(t["inserted"] + t["updated"] for t in catch_up["tables"])
    print(f"\ncatch-up (50 new, 20 edited): {seconds:.1f} s wall, {written} rows written")
    noop, seconds, _ = sync_cli("run", *common)
    written = sum(t["inserted"] + t["updated"] for t in noop["tables"])
    print(f"no-op catch-up: {seconds:.1f} s wall, {written} rows written")

    dump = pg_dump_seconds(server, source)
    print(f"\npg_dump --data-only | psql of the same tables: {dump:.1f} s")


if __name__ == "__main__":
    main()
