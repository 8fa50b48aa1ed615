"""The seed scenario with files: `sync run --since 2024-11-18` brings every production document's file,
under the owner's target id, leaves development's own files alone, and a rerun sends nothing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import aiohttp
import asyncpg
from queries import SEED_MAPPING

from devkit import scenario
from sync.auth import AuthOptions
from sync.connect import Endpoint, Side
from sync.mapping import load_mapping
from sync.preview import preview
from sync.run import RunOptions, auth_import, run_sync
from sync.storage.select import owner_rewrite
from sync.storage.stage import StorageAccess, StorageStage
from sync.storage.transfer import TransferSettings
from tests.storage_api_server import StorageApiServer

KEY = "service-role-key"
# A small resumable threshold, so the scenario's larger files go through the TUS endpoint.
SETTINGS = TransferSettings(concurrency=4, resumable_threshold=32_000, resumable_chunk=16_000)


async def fetch_all(server: StorageApiServer, paths: list[str]) -> dict[str, bytes | None]:
    """Download ``paths`` from the documents bucket; None for a path that is not there."""
    headers = {"Authorization": f"Bearer {KEY}"}
    found: dict[str, bytes | None] = {}
    base = f"{server.url}/storage/v1/object/{scenario.FILES_BUCKET}"
    async with aiohttp.ClientSession(headers=headers) as http:
        for path in paths:
            async with http.get(f"{base}/{path}") as answer:
                found[path] = await answer.read() if answer.status == 200 else None
    return found


async def test_every_production_documents_file_arrives_with_its_row_and_only_once(
    seed_dbs, seed: scenario.Scenario, tmp_path: Path
):
    production, development = seed_dbs
    data = seed
    source, target = Endpoint.parse(Side.SOURCE, production.url), Endpoint.parse(Side.TARGET, development.url)
    async with (
        StorageApiServer(production.url, tmp_path / "production") as prod_api,
        StorageApiServer(development.url, tmp_path / "development") as dev_api,
    ):
        await scenario.upload_files(prod_api.url, KEY, scenario.document_files(data.production))
        own = scenario.document_files(data.dev_only)
        await scenario.upload_files(dev_api.url, KEY, own)
        tconn = await asyncpg.connect(development.url)
        own_versions = dict(await tconn.fetch("SELECT name, version FROM storage.objects"))
        stage = StorageStage(StorageAccess(prod_api.url, KEY, dev_api.url, KEY), SETTINGS)
        planned = await preview(source, target, load_mapping(SEED_MAPPING), scenario.COPY_DATE)
        count = len(data.production.rows["documents"])
        assert planned.files[0].startswith(f"bucket documents: {count:,} ("), planned.files

        report = await run_sync(
            source,
            target,
            load_mapping(SEED_MAPPING),
            RunOptions(since=scenario.COPY_DATE),
            auth_stage=auth_import(AuthOptions()),
            storage_stage=stage,
        )

        assert report.exit_code == 0 and report.storage is not None, report.to_json()
        assert report.storage.quarantined == 0
        users = dict(
            await tconn.fetch(
                "SELECT source_key, target_key FROM _sync.id_map WHERE table_name = 'auth.users'"
            )
        )
        documents = dict(
            await tconn.fetch(
                "SELECT source_key, target_key FROM _sync.id_map WHERE table_name = 'public.documents'"
            )
        )
        target_paths = dict(await tconn.fetch("SELECT id::text, storage_path FROM public.documents"))
        expected = {}
        for doc in data.production.rows["documents"]:
            path = doc["storage_path"]
            row_path = target_paths[documents.get(str(doc["id"]), str(doc["id"]))]
            assert row_path == owner_rewrite(path, users), doc["id"]
            expected[row_path] = hashlib.sha256(scenario.file_bytes(path)).hexdigest()
        moved = [p for p in expected if p.partition("/")[0] in set(users.values())]
        assert moved, "the scenario has re-registered people with documents"
        landed = await fetch_all(dev_api, sorted(expected))
        wrong = [p for p, want in expected.items() if hashlib.sha256(landed[p] or b"").hexdigest() != want]
        assert wrong == [] and len(expected) == len(data.production.rows["documents"])
        assert report.storage.copied_total.objects == len(expected)
        mine = await fetch_all(dev_api, own)
        assert all(mine[p] == scenario.file_bytes(p) for p in own)
        versions = dict(
            await tconn.fetch("SELECT name, version FROM storage.objects WHERE name = ANY($1)", own)
        )
        assert versions == {p: own_versions[p] for p in own}  # development's own files untouched

        uploads = dev_api.uploads
        again = await run_sync(source, target, load_mapping(SEED_MAPPING), RunOptions(), storage_stage=stage)
        await tconn.close()

    assert again.storage is not None and again.storage.copied_total.bytes == 0
    assert again.storage.present_total.objects == len(expected) and dev_api.uploads == uploads
    assert "files: 0 copied (0 B" in again.storage.summary()
