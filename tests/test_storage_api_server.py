"""The local Storage API server, driven over real HTTP by the ``supabase`` client's storage and by httpx."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from storage3.exceptions import StorageApiError
from supabase import AsyncClientOptions, acreate_client

from tests.storage_api_server import (
    FAULT_COMMIT_THEN_DROP,
    FAULT_CUT,
    FAULT_RATE_LIMIT,
    ROUTE_DOWNLOAD,
    ROUTE_UPLOAD,
    Faults,
    StorageApiServer,
)


@contextlib.asynccontextmanager
async def storage_client(server: StorageApiServer) -> AsyncIterator[Any]:
    """``client.storage`` of a real Supabase client pointed at ``server``."""
    options = AsyncClientOptions(auto_refresh_token=False, persist_session=False)
    client = await acreate_client(server.url, server.service_key, options=options)
    yield client.storage


@contextlib.asynccontextmanager
async def raw_http(server: StorageApiServer) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on the Storage base path, sending the service key."""
    headers = {"Authorization": f"Bearer {server.service_key}", "apikey": server.service_key}
    async with httpx.AsyncClient(base_url=f"{server.url}/storage/v1", headers=headers) as http:
        yield http


@pytest.fixture
async def db(supabase_db) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(supabase_db.admin_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def api(supabase_db, tmp_path: Path) -> AsyncIterator[StorageApiServer]:
    async with StorageApiServer(supabase_db.url, tmp_path / "blobs") as running:
        yield running


async def object_row(db: asyncpg.Connection, bucket: str, name: str) -> asyncpg.Record | None:
    return await db.fetchrow("SELECT * FROM storage.objects WHERE bucket_id = $1 AND name = $2", bucket, name)


async def test_a_bucket_is_created_with_its_settings_and_read_back_by_the_client(api, db) -> None:
    async with storage_client(api) as storage:
        await storage.create_bucket(
            "docs",
            options={"public": False, "file_size_limit": "2MB", "allowed_mime_types": ["application/pdf"]},
        )
        bucket = await storage.get_bucket("docs")
        assert (bucket.id, bucket.public, bucket.file_size_limit) == ("docs", False, 2 * 1024 * 1024)
        assert bucket.allowed_mime_types == ["application/pdf"]
        assert [b.id for b in await storage.list_buckets()] == ["docs"]
        with pytest.raises(StorageApiError) as dup:
            await storage.create_bucket("docs")
        assert (str(dup.value.status), dup.value.message) == ("409", "The resource already exists")
        with pytest.raises(StorageApiError) as missing:
            await storage.get_bucket("nope")
        assert (str(missing.value.status), missing.value.message) == ("404", "Bucket not found")
    assert (
        await db.fetchval("SELECT file_size_limit FROM storage.buckets WHERE id = 'docs'") == 2 * 1024 * 1024
    )


async def test_a_client_upload_writes_the_row_the_server_writes_and_downloads_the_same_bytes(api, db) -> None:
    data = b"%PDF-1.4 " + bytes(range(256)) * 40
    async with storage_client(api) as storage:
        await storage.create_bucket("docs")
        await storage.from_("docs").upload(
            "u1/a.pdf", data, {"content-type": "application/pdf", "metadata": {"kind": "id"}}
        )
        assert await storage.from_("docs").download("u1/a.pdf") == data
        info = await storage.from_("docs").info("u1/a.pdf")
        assert not await storage.from_("docs").exists("u1/missing.pdf")
        listed = await storage.from_("docs").list("u1")
    row = await object_row(db, "docs", "u1/a.pdf")
    assert row is not None and row["owner_id"] is None
    metadata = json.loads(row["metadata"])
    assert metadata["eTag"] == f'"{hashlib.md5(data).hexdigest()}"'
    assert (metadata["size"], metadata["mimetype"], metadata["cacheControl"]) == (
        len(data),
        "application/pdf",
        "max-age=3600",
    )
    assert json.loads(row["user_metadata"]) == {"kind": "id"}
    assert (info["size"], info["etag"], info["metadata"]) == (len(data), metadata["eTag"], {"kind": "id"})
    assert [e["name"] for e in listed] == ["a.pdf"]
    assert (api.blob_path("docs", "u1/a.pdf", row["version"])).read_bytes() == data


async def test_x_upsert_decides_whether_an_existing_object_is_replaced(api, db) -> None:
    async with raw_http(api) as http:
        await http.post("/bucket", json={"name": "docs"})
        first = await http.post("/object/docs/a.txt", content=b"one", headers={"Content-Type": "text/plain"})
        assert first.status_code == 200 and first.json()["Key"] == "docs/a.txt"
        old = await object_row(db, "docs", "a.txt")
        again = await http.post("/object/docs/a.txt", content=b"two", headers={"Content-Type": "text/plain"})
        assert again.status_code == 400
        assert again.json() | {"code": None} == {
            "statusCode": "409",
            "error": "Duplicate",
            "message": "The resource already exists",
            "code": None,
        }
        meta = base64.b64encode(json.dumps({"v": 2}).encode()).decode()
        upsert = await http.post(
            "/object/docs/a.txt",
            content=b"two!",
            headers={
                "Content-Type": "text/plain",
                "x-upsert": "true",
                "Cache-Control": "max-age=60",
                "x-metadata": meta,
            },
        )
        assert upsert.status_code == 200
        download = await http.get("/object/docs/a.txt")
    new = await object_row(db, "docs", "a.txt")
    assert download.content == b"two!" and download.headers["ETag"] == f'"{hashlib.md5(b"two!").hexdigest()}"'
    assert new["id"] == old["id"] and new["version"] != old["version"]
    assert json.loads(new["metadata"])["cacheControl"] == "max-age=60"
    assert json.loads(new["user_metadata"]) == {"v": 2}
    assert not api.blob_path("docs", "a.txt", old["version"]).exists()


async def test_the_bucket_limits_are_enforced_with_the_servers_codes_and_messages(api, db) -> None:
    async with raw_http(api) as http:
        await http.post(
            "/bucket", json={"name": "img", "file_size_limit": 1024, "allowed_mime_types": ["image/*"]}
        )
        big = await http.post(
            "/object/img/big.png", content=b"x" * 2048, headers={"Content-Type": "image/png"}
        )
        pdf = await http.post(
            "/object/img/a.pdf", content=b"%PDF", headers={"Content-Type": "application/pdf"}
        )
        ok = await http.post("/object/img/a.png", content=b"png", headers={"Content-Type": "image/png"})
    assert (big.status_code, big.json()["statusCode"], big.json()["error"]) == (
        400,
        "413",
        "Payload too large",
    )
    assert big.json()["message"] == "The object exceeded the maximum allowed size"
    assert (pdf.status_code, pdf.json()["statusCode"]) == (400, "415")
    assert pdf.json()["message"] == "mime type application/pdf is not supported"
    assert ok.status_code == 200
    names = [r["name"] for r in await db.fetch("SELECT name FROM storage.objects ORDER BY name")]
    assert names == ["a.png"]


async def test_a_rate_limit_says_when_to_come_back(supabase_db, tmp_path) -> None:
    faults = Faults(routes=frozenset({ROUTE_UPLOAD}), script=[FAULT_RATE_LIMIT], retry_after="3")
    async with StorageApiServer(supabase_db.url, tmp_path, faults=faults) as api, raw_http(api) as http:
        await http.post("/bucket", json={"name": "docs"})
        limited = await http.post("/object/docs/a.txt", content=b"a")
        after = await http.post("/object/docs/a.txt", content=b"a")
    assert (limited.status_code, limited.headers["Retry-After"]) == (429, "3")
    assert after.status_code == 200 and api.faults_injected[FAULT_RATE_LIMIT] == 1


async def test_a_dropped_answer_hides_an_upload_that_committed(supabase_db, tmp_path, db) -> None:
    faults = Faults(routes=frozenset({ROUTE_UPLOAD}), script=[FAULT_COMMIT_THEN_DROP])
    async with StorageApiServer(supabase_db.url, tmp_path, faults=faults) as api, raw_http(api) as http:
        await http.post("/bucket", json={"name": "docs"})
        with pytest.raises(httpx.TransportError):
            await http.post("/object/docs/a.txt", content=b"landed")
        assert api.uploads == 1
    assert json.loads((await object_row(db, "docs", "a.txt"))["metadata"])["size"] == 6


async def test_a_cut_download_ends_before_its_declared_length(supabase_db, tmp_path) -> None:
    faults = Faults(routes=frozenset({ROUTE_DOWNLOAD}), script=[FAULT_CUT])
    async with StorageApiServer(supabase_db.url, tmp_path, faults=faults) as api, raw_http(api) as http:
        await http.post("/bucket", json={"name": "docs"})
        await http.post("/object/docs/a.bin", content=b"z" * 300_000)
        with pytest.raises(httpx.TransportError):
            await http.get("/object/docs/a.bin")
        whole = await http.get("/object/docs/a.bin")
    assert whole.content == b"z" * 300_000


async def test_a_resumable_upload_lands_chunk_by_chunk_and_says_its_offset(api, db) -> None:
    data = bytes(range(256)) * 1000

    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    async with raw_http(api) as http:
        await http.post("/bucket", json={"name": "docs"})
        tus = {"Tus-Resumable": "1.0.0"}
        meta = f"bucketName {b64('docs')},objectName {b64('u/big.bin')},contentType {b64('application/zip')}"
        created = await http.post(
            "/upload/resumable", headers={**tus, "Upload-Length": str(len(data)), "Upload-Metadata": meta}
        )
        assert created.status_code == 201
        location = created.headers["Location"]
        patch = {**tus, "Content-Type": "application/offset+octet-stream"}
        first = await http.patch(location, content=data[:100_000], headers={**patch, "Upload-Offset": "0"})
        assert first.headers["Upload-Offset"] == "100000"
        assert await object_row(db, "docs", "u/big.bin") is None
        head = await http.head(location, headers=tus)
        assert head.headers["Upload-Offset"] == "100000"
        stale = await http.patch(location, content=data[:10], headers={**patch, "Upload-Offset": "0"})
        assert stale.status_code == 409
        rest = await http.patch(
            location, content=data[100_000:], headers={**patch, "Upload-Offset": "100000"}
        )
        assert rest.status_code == 204
        assert (await http.get("/object/docs/u/big.bin")).content == data
    metadata = json.loads((await object_row(db, "docs", "u/big.bin"))["metadata"])
    assert (metadata["size"], metadata["mimetype"]) == (len(data), "application/zip")


async def test_removed_objects_leave_the_table_and_the_disk(api, db) -> None:
    async with storage_client(api) as storage:
        await storage.create_bucket("docs")
        for name in ("a/1.txt", "a/2.txt", "b.txt"):
            await storage.from_("docs").upload(name, b"x", {"content-type": "text/plain"})
        top = await storage.from_("docs").list()
        removed = await storage.from_("docs").remove(["a/1.txt", "b.txt"])
    assert sorted((e["name"], e["id"] is None) for e in top) == [("a", True), ("b.txt", False)]
    assert sorted(r["name"] for r in removed) == ["a/1.txt", "b.txt"]
    assert [r["name"] for r in await db.fetch("SELECT name FROM storage.objects")] == ["a/2.txt"]


async def test_a_wrong_key_is_refused(api) -> None:
    async with httpx.AsyncClient(base_url=f"{api.url}/storage/v1") as http:
        answer = await http.get("/bucket", headers={"Authorization": "Bearer nope"})
    assert answer.status_code == 400 and answer.json()["statusCode"] == "403"
