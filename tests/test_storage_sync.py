"""The storage stage against two local Storage API servers: files arrive with their rows, once and intact."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import httpx
import pytest

from sync.state import ensure_state
from sync.storage import (
    BucketRule,
    ColumnRule,
    StorageApi,
    StorageReport,
    StorageRules,
    TransferSettings,
    copy_storage,
    survey_storage,
)
from tests.storage_api_server import (
    FAULT_BAD_GATEWAY,
    FAULT_COMMIT_THEN_DROP,
    FAULT_CUT,
    FAULT_RATE_LIMIT,
    FAULT_SERVER_ERROR,
    FAULT_SERVICE_UNAVAILABLE,
    ROUTE_DOWNLOAD,
    ROUTE_TUS,
    ROUTE_UPLOAD,
    Faults,
    StorageApiServer,
)

ROOT = Path(__file__).resolve().parent.parent
DOCS = "CREATE TABLE public.docs (id bigint PRIMARY KEY, owner uuid NOT NULL, path text)"
RULE = ColumnRule(
    table="public.docs", key="id", column="path", bucket="documents", map_tables=("public.docs",)
)
FAST = TransferSettings(concurrency=4, attempts=15, initial_wait=0.01, max_wait=0.05)


def content(n: int, size: int) -> bytes:
    """Deterministic bytes of one file."""
    block = hashlib.sha256(f"file {n}".encode()).digest()
    return (block * (size // len(block) + 1))[:size]


@dataclass
class Project:
    """One side: its database (a superuser connection) and its Storage API server."""

    conn: asyncpg.Connection
    url: str
    server: StorageApiServer

    def api(self, side: str) -> StorageApi:
        return StorageApi(
            self.server.url, self.server.service_key, side=side, initial_wait=0.01, max_wait=0.05
        )

    async def put(
        self, path: str, data: bytes, mime: str = "application/pdf", bucket: str = "documents"
    ) -> None:
        headers = {
            "Authorization": f"Bearer {self.server.service_key}",
            "Content-Type": mime,
            "Cache-Control": "max-age=600",
            "x-upsert": "true",
        }
        async with httpx.AsyncClient() as http:
            answer = await http.post(
                f"{self.server.url}/storage/v1/object/{bucket}/{path}", content=data, headers=headers
            )
        assert answer.status_code == 200, answer.text

    async def get(self, path: str, bucket: str = "documents") -> bytes | None:
        headers = {"Authorization": f"Bearer {self.server.service_key}"}
        async with httpx.AsyncClient() as http:
            answer = await http.get(f"{self.server.url}/storage/v1/object/{bucket}/{path}", headers=headers)
        return answer.content if answer.status_code == 200 else None

    async def bucket(self, name: str, **settings: object) -> None:
        headers = {"Authorization": f"Bearer {self.server.service_key}"}
        async with httpx.AsyncClient() as http:
            answer = await http.post(
                f"{self.server.url}/storage/v1/bucket", json={"name": name, **settings}, headers=headers
            )
        assert answer.status_code == 200, answer.text

    async def names(self, bucket: str = "documents") -> list[str]:
        rows = await self.conn.fetch(
            "SELECT name FROM storage.objects WHERE bucket_id = $1 ORDER BY name", bucket
        )
        return [r["name"] for r in rows]


@pytest.fixture
async def projects(make_db, tmp_path) -> AsyncIterator[tuple[Project, Project]]:
    """Production (source) and development (target), each with a docs table and its own Storage API."""
    made = []
    for side in ("source", "target"):
        db = make_db()
        conn = await asyncpg.connect(db.url)
        await conn.execute(DOCS)
        server = StorageApiServer(db.url, tmp_path / side)
        await server.start()
        made.append(Project(conn, db.url, server))
    await ensure_state(made[1].conn)
    yield made[0], made[1]
    for project in made:
        await project.server.close()
        await project.conn.close()


async def run(
    source: Project, target: Project, settings: TransferSettings = FAST, **rule: object
) -> StorageReport:
    rules = StorageRules(columns=(ColumnRule(**{**RULE.__dict__, **rule}),))
    async with source.api("source") as sapi, target.api("target") as tapi:
        return await copy_storage(
            source.conn, target.conn, sapi, tapi, rules, since=None, run_id=1, settings=settings
        )


async def seed(
    source: Project, target: Project, count: int, size: int = 3000, large: int = 0
) -> dict[str, bytes]:
    """``count`` documents with files in production, all copied as rows into development; ``large`` of
    them bigger than the resumable threshold of the fast settings. Returns path → bytes."""
    await source.bucket(
        "documents", file_size_limit="10MB", allowed_mime_types=["application/pdf", "image/*"]
    )
    files = {}
    for n in range(count):
        owner = uuid.UUID(int=n + 1)
        path = f"{owner}/{n}.pdf"
        files[path] = content(n, size * 40 if n < large else size + n)
        await source.put(path, files[path])
        for project in (source, target):
            await project.conn.execute("INSERT INTO public.docs VALUES ($1, $2, $3)", n, owner, path)
    return files


async def test_every_referenced_file_arrives_with_the_same_bytes_and_a_rerun_sends_nothing(projects) -> None:
    source, target = projects
    files = await seed(source, target, 12)
    # A production document the run did not copy (no row on the target) and a file no row references.
    await source.conn.execute("INSERT INTO public.docs VALUES (99, $1, 'late/99.pdf')", uuid.uuid4())
    await source.put("late/99.pdf", b"late")
    await source.put("orphan/x.pdf", b"nobody points here")
    # Development's own document and file.
    await target.bucket(
        "documents", file_size_limit="10MB", allowed_mime_types=["application/pdf", "image/*"]
    )
    await target.put("dev/own.pdf", b"development's own file")
    await target.conn.execute("INSERT INTO public.docs VALUES (500, $1, 'dev/own.pdf')", uuid.uuid4())
    dev_version = await target.conn.fetchval("SELECT version FROM storage.objects WHERE name = 'dev/own.pdf'")

    planned = await survey_storage(source.conn, target.conn, StorageRules(columns=(RULE,)), since=None)
    assert (planned.to_copy["documents"].objects, planned.to_copy["documents"].bytes) == (
        12,
        sum(len(b) for b in files.values()),
    )

    report = await run(source, target)

    assert report.copied_total.objects == 12 and report.quarantined == 0 and report.exit_code == 0
    for path, data in files.items():
        assert hashlib.sha256(await target.get(path) or b"").digest() == hashlib.sha256(data).digest(), path
    assert await target.names() == sorted([*files, "dev/own.pdf"])
    assert await target.get("dev/own.pdf") == b"development's own file"
    assert (
        await target.conn.fetchval("SELECT version FROM storage.objects WHERE name = 'dev/own.pdf'")
        == dev_version
    )
    kept = json.loads(
        await target.conn.fetchval("SELECT metadata FROM storage.objects WHERE name = $1", next(iter(files)))
    )
    assert (kept["mimetype"], kept["cacheControl"]) == ("application/pdf", "max-age=600")
    assert await target.conn.fetchval("SELECT count(*) FROM _sync.storage_objects") == 12

    uploads = target.server.uploads
    again = await run(source, target)
    assert (again.copied_total.objects, again.copied_total.bytes, again.present_total.objects) == (0, 0, 12)
    assert target.server.uploads == uploads
    assert "files: 0 copied (0 B" in again.summary()


async def test_a_missing_bucket_is_created_with_the_source_settings_and_a_differing_one_is_reported(
    projects,
) -> None:
    source, target = projects
    await seed(source, target, 2)
    await run(source, target)
    bucket = await target.conn.fetchrow("SELECT * FROM storage.buckets WHERE id = 'documents'")
    assert (bucket["file_size_limit"], bucket["allowed_mime_types"]) == (
        10 * 1024 * 1024,
        ["application/pdf", "image/*"],
    )
    await target.conn.execute("UPDATE storage.buckets SET public = true WHERE id = 'documents'")
    again = await run(source, target)
    assert again.drift == {"documents": ["public is True on the target, False in the source"]}
    assert await target.conn.fetchval("SELECT public FROM storage.buckets WHERE id = 'documents'")


async def test_a_re_registered_users_files_move_under_their_target_id_and_the_rows_follow(projects) -> None:
    source, target = projects
    files = await seed(source, target, 3)
    old_id, new_id = str(uuid.UUID(int=2)), str(uuid.uuid4())
    moved = f"{old_id}/1.pdf"
    # The copy gave the person's document a new key (5 was taken) and their target id.
    await target.conn.execute("DELETE FROM public.docs WHERE id = 1")
    await target.conn.execute("INSERT INTO public.docs VALUES (105, $1, $2)", uuid.UUID(new_id), moved)
    await target.conn.execute(
        "INSERT INTO _sync.id_map (table_name, source_key, target_key, reason) VALUES "
        "('auth.users', $1, $2, 'email'), ('public.docs', '1', '105', 'collision')",
        old_id,
        new_id,
    )

    report = await run(source, target, owner_prefix=True)

    assert report.repointed == 1
    assert await target.conn.fetchval("SELECT path FROM public.docs WHERE id = 105") == f"{new_id}/1.pdf"
    assert await target.get(f"{new_id}/1.pdf") == files[moved]
    assert moved not in await target.names()
    uploads = target.server.uploads
    again = await run(source, target, owner_prefix=True)
    assert (again.copied_total.objects, again.repointed, target.server.uploads) == (0, 0, uploads)


async def test_refused_and_missing_files_are_quarantined_with_the_api_message_and_the_rest_lands(
    projects,
) -> None:
    source, target = projects
    await seed(source, target, 1)
    await target.bucket("documents", file_size_limit=5000, allowed_mime_types=["application/pdf"])
    await source.put("big.pdf", b"x" * 6000)
    await source.put("photo.png", b"png", mime="image/png")
    for n, path in ((10, "big.pdf"), (11, "photo.png"), (12, "gone.pdf")):
        for project in (source, target):
            await project.conn.execute("INSERT INTO public.docs VALUES ($1, $2, $3)", n, uuid.uuid4(), path)

    report = await run(source, target)

    assert report.exit_code == 3 and report.copied_total.objects == 1
    errors = dict(
        await target.conn.fetch("SELECT source_key, error FROM _sync.quarantine WHERE resolved_at IS NULL")
    )
    assert (
        errors["documents/big.pdf"] == "413 Payload too large: The object exceeded the maximum allowed size"
    )
    assert errors["documents/photo.png"] == "415 invalid_mime_type: mime type image/png is not supported"
    assert errors["documents/gone.pdf"].startswith("missing in the source")
    await target.conn.execute("UPDATE storage.buckets SET file_size_limit = NULL, allowed_mime_types = NULL")
    healed = await run(source, target)
    assert healed.copied_total.objects == 2 and healed.quarantined == 1
    assert await target.conn.fetchval("SELECT count(*) FROM _sync.quarantine WHERE resolved_at IS NULL") == 1


async def test_with_30_percent_faults_every_file_lands_once_and_intact(projects, caplog) -> None:
    source, target = projects
    files = await seed(source, target, 24, large=4)
    kinds = (
        FAULT_RATE_LIMIT,
        FAULT_SERVER_ERROR,
        FAULT_SERVICE_UNAVAILABLE,
        FAULT_BAD_GATEWAY,
        FAULT_CUT,
        FAULT_COMMIT_THEN_DROP,
    )
    routes = frozenset({ROUTE_UPLOAD, ROUTE_DOWNLOAD, ROUTE_TUS})
    source.server.faults = Faults(seed=3, rate=0.3, routes=routes, kinds=kinds, retry_after="0")
    target.server.faults = Faults(seed=4, rate=0.3, routes=routes, kinds=kinds, retry_after="0")
    settings = TransferSettings(
        concurrency=4,
        attempts=20,
        initial_wait=0.01,
        max_wait=0.05,
        resumable_threshold=64_000,
        resumable_chunk=32_000,
    )

    with caplog.at_level(logging.WARNING, logger="sync.retry"):
        report = await run(source, target, settings)

    assert report.refusals == [] and report.copied_total.objects == 24
    injected, target.server.faults = target.server.faults_injected, None
    for path, data in files.items():
        assert await target.get(path) == data, path
    assert set(target.server.committed.values()) == {1}  # none sent twice, though some answers were lost
    assert injected[FAULT_COMMIT_THEN_DROP] > 0 and source.server.faults_injected[FAULT_CUT] > 0
    assert any(e.method == "PATCH" for e in target.server.exchanges)  # large files went through TUS
    assert report.retries > 0 and sum("retrying in" in r.message for r in caplog.records) >= report.retries


_ENGINE = """
import asyncio, sys
import asyncpg
from sync.storage import ColumnRule, StorageApi, StorageRules, TransferSettings, copy_storage

async def main(source_db, target_db, source_url, target_url, key):
    sconn, tconn = await asyncpg.connect(source_db), await asyncpg.connect(target_db)
    rules = StorageRules(columns=(ColumnRule("public.docs", "id", "path", "documents"),))
    settings = TransferSettings(concurrency=2)
    async with StorageApi(source_url, key, side="source") as s:
        async with StorageApi(target_url, key, side="target") as t:
            await copy_storage(sconn, tconn, s, t, rules, since=None, run_id=1, settings=settings)

asyncio.run(main(*sys.argv[1:]))
"""


async def test_a_run_killed_mid_upload_resumes_without_sending_again_what_landed(projects) -> None:
    source, target = projects
    files = await seed(source, target, 16)
    target.server.upload_delay = 0.1
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _ENGINE,
            source.url,
            target.url,
            source.server.url,
            target.server.url,
            "service-role-key",
        ],
        env=env,
    )
    try:
        for _ in range(600):
            if target.server.uploads >= 5:
                break
            await asyncio.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    await asyncio.sleep(0.3)  # an upload whose last byte had arrived still commits
    landed = set(target.server.committed)
    assert 5 <= len(landed) < 16

    target.server.upload_delay = 0.0
    report = await run(source, target)

    for path, data in files.items():
        assert await target.get(path) == data, path
    assert set(target.server.committed.values()) == {1}
    assert report.copied_total.objects == 16 - len(landed) and report.present_total.objects == len(landed)


async def test_a_whole_bucket_brings_the_objects_updated_in_the_window(projects) -> None:
    source, target = projects
    await source.bucket("avatars", public=True)
    for name in ("a/1.png", "b/2.png", "old/3.png"):
        await source.put(name, content(len(name), 500), mime="image/png", bucket="avatars")
    # An avatar last changed long before the window (the server stamps uploads with now()).
    await source.conn.execute("UPDATE storage.objects SET updated_at = '2024-01-01' WHERE name = 'old/3.png'")
    rules = StorageRules(buckets=(BucketRule("avatars"),))
    since = datetime(2024, 11, 18, tzinfo=UTC)

    async with source.api("source") as sapi, target.api("target") as tapi:
        report = await copy_storage(
            source.conn, target.conn, sapi, tapi, rules, since=since, run_id=1, settings=FAST
        )

    assert report.copied_total.objects == 2 and report.created_buckets == ["avatars"]
    assert await target.names("avatars") == ["a/1.png", "b/2.png"]
    assert await target.conn.fetchval("SELECT public FROM storage.buckets WHERE id = 'avatars'")
