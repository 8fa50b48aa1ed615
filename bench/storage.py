"""The storage stage's speed and memory, against two local Storage API servers in processes of their own.

    python -m bench.storage [--files 1004] [--big-mb 200] [--concurrency 4]

Seeds production with ``--files`` documents of 2–40 KB (the seed scenario's size range) and one file
of ``--big-mb`` MB, then runs the storage stage in a child process, twice: the documents (MB/s,
objects/s), then the big file alone (MB/s, and the child's peak RSS, which must stay far below the
file's size: the bytes are streamed, never held). A rerun of the documents shows the no-op cost.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import httpx
import psycopg

from devkit import testbed
from devkit.embedded import ensure_server
from sync.state import ensure_state

ROOT = Path(__file__).resolve().parent.parent
KEY = "service-role-key"
DOCS = "CREATE TABLE public.docs (id bigint PRIMARY KEY, owner uuid NOT NULL, path text)"

_ENGINE = """
import asyncio, json, sys
import asyncpg
from sync.storage import ColumnRule, StorageApi, StorageRules, TransferSettings, copy_storage

async def main(source_db, target_db, source_url, target_url, key, table, concurrency):
    sconn, tconn = await asyncpg.connect(source_db), await asyncpg.connect(target_db)
    rules = StorageRules(columns=(ColumnRule(table, "id", "path", "documents"),))
    settings = TransferSettings(concurrency=int(concurrency))
    async with StorageApi(source_url, key, side="source") as s:
        async with StorageApi(target_url, key, side="target") as t:
            r = await copy_storage(sconn, tconn, s, t, rules, since=None, run_id=1, settings=settings)
    print(json.dumps({"copied": r.copied_total.objects, "bytes": r.copied_total.bytes,
                      "present": r.present_total.objects, "quarantined": r.quarantined,
                      "seconds": r.elapsed, "mb_per_s": r.mb_per_s, "objects_per_s": r.objects_per_s}))

asyncio.run(main(*sys.argv[1:]))
"""


def start_api(database_url: str, root: Path) -> tuple[subprocess.Popen[str], str]:
    """A Storage API server in a child process; returns it and its URL."""
    child = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "storage_api_server.py"), database_url, str(root), str(2**40)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert child.stdout is not None
    return child, child.stdout.readline().strip()


def engine(args: list[str]) -> tuple[dict, int, float]:
    """Run the storage stage in a child; return its report, its own peak RSS in KiB and CPU seconds."""
    with tempfile.TemporaryFile("w+") as out:
        child = subprocess.Popen(
            [sys.executable, "-c", _ENGINE, *args], stdout=out, env={**os.environ, "PYTHONPATH": str(ROOT)}
        )
        _, status, usage = os.wait4(child.pid, 0)
        if os.waitstatus_to_exitcode(status):
            raise SystemExit("the storage stage failed")
        out.seek(0)
        return json.loads(out.read()), usage.ru_maxrss, usage.ru_utime + usage.ru_stime


async def seed(source_url: str, api: str, target_url: str, files: int, big_mb: int) -> None:
    sconn, tconn = await asyncpg.connect(source_url), await asyncpg.connect(target_url)
    await ensure_state(tconn)
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=f"{api}/storage/v1", headers=headers, timeout=600) as http:
        await http.post("/bucket", json={"name": "documents"})
        semaphore = asyncio.Semaphore(8)

        async def put(n: int) -> None:
            path = f"{uuid.UUID(int=n + 1)}/{n}.pdf"
            block = hashlib.sha256(str(n).encode()).digest()
            size = 2048 + (n * 7919) % (38 * 1024)
            async with semaphore:
                await http.post(f"/object/documents/{path}", content=(block * (size // 32 + 1))[:size])

        await asyncio.gather(*(put(n) for n in range(files)))
        rows = [(n, uuid.UUID(int=n + 1), f"{uuid.UUID(int=n + 1)}/{n}.pdf") for n in range(files)]
        for conn in (sconn, tconn):
            await conn.executemany("INSERT INTO public.docs VALUES ($1, $2, $3)", rows)

        async def big_body():
            block = os.urandom(1024 * 1024)
            for _ in range(big_mb):
                yield block

        headers = {"Content-Type": "application/zip", "Content-Length": str(big_mb * 1024 * 1024)}
        await http.post("/object/documents/big/archive.zip", content=big_body(), headers=headers)
        for conn in (sconn, tconn):
            await conn.execute("CREATE TABLE public.big (id bigint PRIMARY KEY, path text)")
            await conn.execute("INSERT INTO public.big VALUES (1, 'big/archive.zip')")
    await sconn.close()
    await tconn.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.storage")
    parser.add_argument("--files", type=int, default=1004)
    parser.add_argument("--big-mb", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    server = ensure_server()
    testbed.prepare_cluster(server)
    template = testbed.supabase_template(server)
    dbs = [
        testbed.create_database(server, f"bench_storage_{side}_{os.getpid()}", template.name) for side in "st"
    ]
    children = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for db in dbs:
                with psycopg.connect(db.url, autocommit=True) as conn:
                    conn.execute(DOCS)
            (source_api, source_url), (target_api, target_url) = (
                start_api(db.url, Path(tmp) / db.name) for db in dbs
            )
            children += [source_api, target_api]
            started = time.perf_counter()
            asyncio.run(seed(dbs[0].url, source_url, dbs[1].url, args.files, args.big_mb))
            print(f"seeded {args.files:,} files + {args.big_mb} MB in {time.perf_counter() - started:.1f} s")
            common = [dbs[0].url, dbs[1].url, source_url, target_url, KEY]
            for label, table in (
                ("documents", "public.docs"),
                ("rerun", "public.docs"),
                ("big file", "public.big"),
            ):
                report, rss, cpu = engine([*common, table, str(args.concurrency)])
                print(
                    f"{label:>9}: {report['copied']:,} copied ({report['bytes'] / 2**20:,.1f} MB), "
                    f"{report['present']:,} present, {report['seconds']:.2f} s, "
                    f"{report['mb_per_s']:,.1f} MB/s, "
                    f"{report['objects_per_s']:,.0f} objects/s, peak RSS {rss / 1024:,.0f} MB, "
                    f"CPU {cpu:.1f} s"
                )
    finally:
        for child in children:
            child.terminate()
            child.wait()
        for db in dbs:
            testbed.drop_database(server, db.name)


if __name__ == "__main__":
    main()
