"""``make bench``: the seed scenario at a scale, synced end to end, beside the baselines it is judged by.

    python -m bench [--scale 10] [--rounds 3] [--jobs N] [--batch-size 5000]
    make bench SCALE=100 ROUNDS=1

Each round starts from fresh copies of the same production and development databases and measures, in
an order that alternates between rounds: the full run (``--since 2024-11-18``, wall time with start-up,
the auth import's users/s, each table's rows/s, peak RSS), a no-op catch-up, a catch-up after 0.1 % of
production's users and rows changed; ``pg_dump --data-only`` of the same six tables piped into ``psql``
of an empty production schema; and a plain binary ``COPY`` of the users and identities the run creates
into the target's own auth tables (the floor of the auth import). Medians over the rounds, the ratios the
performance budget speaks of, and every round's figures go to ``bench/results.json``.

Runs on the server ``DATABASE_URL`` names (a superuser URL), as it is configured, or on a server of the
bench's own beside the project's embedded one (``.pg/<major>-bench/``): durable as a real one is (fsync,
full-page writes and synchronous commit on), where the server the tests and the demo share trades them
for speed. The summary names the server and those three settings. The sync
runs with ``--jobs`` as many as this machine's CPUs, since both of its databases live on one server that
shares them (more jobs than cores only adds contention; give ``--jobs`` for a server elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psycopg
from psycopg import sql

from bench.measure import SyncRun, auth_copy_floor, change_rows, pg_dump_seconds, sync_cli
from devkit import testbed
from devkit.embedded import Server, dedicated_cluster, ensure_server

RESULTS = Path(__file__).parent / "results.json"
SINCE = "2024-11-18"


# A real server's durability, which the embedded server of the tests and the demo turns off.
DURABLE = ("fsync", "full_page_writes", "synchronous_commit")


def bench_server() -> Server:
    """``DATABASE_URL``'s server as it is; else the bench's own, made durable once (``ALTER SYSTEM``)."""
    if os.environ.get("DATABASE_URL"):
        return ensure_server()
    server = dedicated_cluster("bench").ensure_running()
    if any(value != "on" for value in durability(server).values()):
        with psycopg.connect(server.url, autocommit=True) as conn:
            for name in DURABLE:
                conn.execute(sql.SQL("ALTER SYSTEM SET {} = on").format(sql.Identifier(name)))
            conn.execute("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 10
        while any(value != "on" for value in durability(server).values()):
            if time.monotonic() > deadline:
                sys.exit(f"bench: the server in .pg/ did not turn on {', '.join(DURABLE)}")
            time.sleep(0.1)
    return server


def durability(server: Server) -> dict[str, str]:
    """The server's durability settings, as a new session sees them."""
    with psycopg.connect(server.url, autocommit=True) as conn:
        rows = conn.execute("SELECT name, setting FROM pg_settings WHERE name = ANY(%s)", (list(DURABLE),))
        return dict(rows.fetchall())


def scenario_templates(server: Server, scale: int) -> tuple[testbed.Database, testbed.Database]:
    """Production and development at ``scale`` as templates, rebuilt only when the generator changed."""
    digest = testbed.fingerprint(Path("devkit"), str(scale))
    names = (f"bench_tpl_source_{scale}", f"bench_tpl_target_{scale}")
    with psycopg.connect(server.url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = ANY(%s)",
            (list(names),),
        ).fetchall()
    if sorted(rows) == sorted((n, digest) for n in names):
        return testbed.database(server, names[0]), testbed.database(server, names[1])
    template = testbed.supabase_template(server)
    for name in names:
        testbed.drop_database(server, name)
    source, target = (testbed.create_database(server, n, template=template.name) for n in names)
    started = time.perf_counter()
    demo = ["demo", "--source", source.url, "--target", target.url, "--scale", str(scale), "--no-sync"]
    subprocess.run(
        [sys.executable, "-m", "sync", *demo],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    print(f"scenario at scale {scale} built in {time.perf_counter() - started:.1f} s")
    # Vacuumed and analysed, as a live project's databases are, before any copy is made of them: a copy
    # would otherwise pay for setting every row's hint bits on its first read (a full page written to the
    # WAL for each page, as data checksums are on) and plan without statistics, and autovacuum would get
    # to the templates themselves in the middle of a later measurement.
    for db in (source, target):
        with psycopg.connect(db.admin_url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")
    with psycopg.connect(server.url, autocommit=True) as conn:
        for name in names:
            conn.execute(
                sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name), sql.Literal(digest))
            )
            conn.execute(sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE true").format(sql.Identifier(name)))
    return source, target


def quiesce(server: Server) -> None:
    """Write out what is left dirty (a database just copied from its template, the step before), so that
    no measurement pays for what came before it."""
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute("CHECKPOINT")


def fresh(server: Server, name: str, template: str | None) -> testbed.Database:
    """A new database ``name`` (dropped first if left over), a copy of ``template`` or Supabase-shaped."""
    testbed.drop_database(server, name)
    return testbed.create_database(server, name, template=template)


def measure_sync(source: testbed.Database, target: testbed.Database, common: list[str]) -> dict:
    """The full run, a no-op catch-up, and a catch-up after 0.1 % of production changed."""
    full = sync_cli("run", "--since", SINCE, *common)
    noop = sync_cli("run", *common)
    edited = change_rows(source)
    small = sync_cli("run", *common)
    auth = full.report.get("auth") or {}
    return {
        "full_s": full.seconds,
        "peak_mib": max(r.peak_kib for r in (full, noop, small)) / 1024,
        "auth_s": auth.get("seconds", 0.0),
        "auth_created": auth.get("created", 0),
        "tables": {t["table"]: {"rows": t["read"], "seconds": t["seconds"]} for t in full.report["tables"]},
        "noop_s": noop.seconds,
        "noop_written": _written(noop),
        "changed_rows": edited,
        "catch_up_s": small.seconds,
        "catch_up_written": _written(small),
    }


def _written(run: SyncRun) -> int:
    return sum(t["inserted"] + t["updated"] for t in run.report["tables"])


def one_round(server: Server, scale: int, number: int, common_args: list[str]) -> dict:
    """Every measurement once, on fresh copies; odd rounds take the baselines first."""
    src_tpl, tgt_tpl = scenario_templates(server, scale)
    tag = f"{scale}_{os.getpid()}"
    created: list[str] = []

    def copy_of(kind: str, template: str | None) -> testbed.Database:
        db = fresh(server, f"bench_{kind}_{tag}", template)
        created.append(db.name)
        quiesce(server)  # the copy's pages written out before the step that uses it is timed
        return db

    result: dict = {}
    try:
        steps = ["sync", "dump", "floor"]
        if number % 2:
            steps.reverse()
        for step in steps:
            if step == "sync":
                source = copy_of("source", src_tpl.name)
                target = copy_of("target", tgt_tpl.name)
                common = ["--source", source.url, "--target", target.url, *common_args]
                result.update(measure_sync(source, target, common))
            elif step == "dump":
                result["pg_dump_s"] = pg_dump_seconds(src_tpl, copy_of("dump", None))
            else:
                seconds, users, identities = auth_copy_floor(src_tpl, copy_of("floor", tgt_tpl.name))
                result.update(floor_s=seconds, floor_users=users, floor_identities=identities)
            # A step's databases go as soon as it is measured: the server's background work on their
            # fresh rows (autovacuum's analyse and vacuum) would otherwise run during the next step.
            while created:
                testbed.drop_database(server, created.pop())
    finally:
        for name in created:
            testbed.drop_database(server, name)
    return result


def summarise(rounds: list[dict]) -> dict:
    """Medians over the rounds, and the ratios the performance budget is stated in."""

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    tables = {}
    for name in rounds[0]["tables"]:
        rates = [r["tables"][name]["rows"] / max(r["tables"][name]["seconds"], 1e-9) for r in rounds]
        tables[name] = {"rows": rounds[0]["tables"][name]["rows"], "rows_per_s": statistics.median(rates)}
    s = {k: med(k) for k in rounds[0] if k != "tables"}
    s["tables"] = tables
    s["auth_users_per_s"] = s["auth_created"] / s["auth_s"] if s["auth_s"] else 0.0
    s["floor_users_per_s"] = s["floor_users"] / s["floor_s"] if s["floor_s"] else 0.0
    s["ratios"] = {
        "full_vs_pg_dump": s["full_s"] / s["pg_dump_s"],
        "auth_vs_copy_floor": s["auth_s"] / s["floor_s"],
        "noop_vs_pg_dump": s["noop_s"] / s["pg_dump_s"],
        "catch_up_vs_full": s["catch_up_s"] / s["full_s"],
    }
    return s


def print_summary(s: dict, scale: int, rounds: int, jobs: int) -> None:
    """The medians as a table, each figure beside its baseline and the budget's target."""
    r = s["ratios"]
    noop_budget = 1.5 if scale >= 100 else 1.0
    print(f"\nscale {scale}, --jobs {jobs}, median of {rounds} interleaved round(s)")
    lines = [
        (
            "full run (wall, start-up incl.)",
            f"{s['full_s']:.2f} s",
            f"{r['full_vs_pg_dump']:.2f}× pg_dump",
            "≤ 1.5×",
        ),
        (
            f"auth import ({s['auth_created']:.0f} users created)",
            f"{s['auth_s']:.2f} s  {s['auth_users_per_s']:,.0f} users/s",
            f"{r['auth_vs_copy_floor']:.2f}× COPY floor",
            "≤ 1.3×",
        ),
        (
            f"COPY floor ({s['floor_users']:.0f} users, {s['floor_identities']:.0f} identities)",
            f"{s['floor_s']:.2f} s  {s['floor_users_per_s']:,.0f} users/s",
            "",
            "",
        ),
        (
            "no-op catch-up",
            f"{s['noop_s']:.2f} s",
            f"{r['noop_vs_pg_dump']:.2f}× pg_dump",
            f"< {noop_budget} s",
        ),
        (
            f"catch-up after 0.1 % ({s['changed_rows']:.0f} rows edited)",
            f"{s['catch_up_s']:.2f} s",
            f"{r['catch_up_vs_full'] * 100:.1f} % of full run",
            "< 5 %",
        ),
        ("peak RSS of sync", f"{s['peak_mib']:.0f} MiB", "", "< 256 MiB"),
        ("pg_dump --data-only | psql, six tables", f"{s['pg_dump_s']:.2f} s", "1.00×", ""),
    ]
    for what, value, ratio, budget in lines:
        print(f"  {what:<46} {value:>26}  {ratio:>22}  {budget}")
    for name, t in s["tables"].items():
        print(f"  {name:<46} {t['rows']:>10} rows {t['rows_per_s']:>10,.0f} rows/s")


def _cpus() -> int:
    """The CPUs this process may run on (a container's share, not the host's)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", type=int, default=int(os.environ.get("SCALE") or 10))
    parser.add_argument("--rounds", type=int, default=int(os.environ.get("ROUNDS") or 3))
    parser.add_argument("--jobs", type=int, default=_cpus(), help="the sync's --jobs (default: CPUs here)")
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON results go")
    args = parser.parse_args()
    if args.scale < 1 or args.rounds < 1 or args.jobs < 1:
        parser.error("--scale, --rounds and --jobs must be at least 1")

    server = bench_server()
    settings = durability(server)
    common = [
        "--jobs",
        str(args.jobs),
        "--batch-size",
        str(args.batch_size),
        "--mapping",
        "mappings/sync.toml",
    ]
    rounds = []
    for number in range(args.rounds):
        rounds.append(one_round(server, args.scale, number, common))
        r = rounds[-1]
        print(
            f"round {number + 1}: full {r['full_s']:.2f} s, pg_dump {r['pg_dump_s']:.2f} s, "
            f"auth {r['auth_s']:.2f} s, floor {r['floor_s']:.2f} s, no-op {r['noop_s']:.2f} s, "
            f"catch-up {r['catch_up_s']:.2f} s, peak {r['peak_mib']:.0f} MiB"
        )
    summary = summarise(rounds)
    print_summary(summary, args.scale, args.rounds, args.jobs)
    shown = ", ".join(f"{name} {value}" for name, value in settings.items())
    print(f"  server: PostgreSQL {server.version}, {shown}")
    payload = {
        "scale": args.scale,
        "jobs": args.jobs,
        "rounds": rounds,
        "median": summary,
        "server_version": server.version,
        "server_settings": settings,
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
