"""Per object: skip it when the target holds the same content, else stream it across, then checkpoint.

A transfer never holds a file: the download is read in chunks that go straight into the upload's body
(or, for large files, into one bounded buffer of the resumable endpoint's chunk size), and both
digests (MD5, which the Storage server's ``eTag`` is for a simple upload, and SHA-256) are computed on
the way. What landed is checked in the target's ``storage.objects`` (size, and the eTag where it is an
MD5), then recorded in ``_sync.storage_objects`` in the same transaction that points the referencing
rows at the object's target path. A transfer cut by a lost connection, a timeout, a 429 or a 5xx is
retried with backoff; before it is sent again the target is looked at, so an upload whose answer was
lost is not sent twice. An object the target refuses (too large for the bucket, a MIME type it does
not allow) or that the source does not have goes to ``_sync.quarantine`` with the API's message.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg

from sync.errors import first_line

if TYPE_CHECKING:
    import httpx
from sync.retry import retrying
from sync.sqltext import ident, table_ident
from sync.storage.client import (
    STREAM_CHUNK,
    TUS_CHUNK,
    StorageApi,
    StorageApiError,
    Upload,
    is_transient,
    wait_hint,
)
from sync.storage.report import StorageReport
from sync.storage.select import ObjectMeta, Wanted

log = logging.getLogger("sync.storage")

QUARANTINE_TABLE = "storage.objects"
"""``table_name`` of objects in ``_sync.quarantine``; ``source_key`` is ``bucket/target path``."""

_MD5_ETAG = re.compile(r'^"?([0-9a-f]{32})"?$')

Progress = Callable[[int, int], None]
"""Told ``(objects, bytes)`` as objects land or are found present."""


@dataclass(frozen=True)
class TransferSettings:
    """How objects move: parallel transfers, tries per object, and when the resumable endpoint is used."""

    concurrency: int = 4
    attempts: int = 8
    initial_wait: float = 0.5
    max_wait: float = 30.0
    resumable_threshold: int = TUS_CHUNK
    resumable_chunk: int = TUS_CHUNK


class TransferError(Exception):
    """A transfer that went wrong in a way a new attempt may not (a short or altered stream)."""


class Refused(Exception):
    """The object cannot be copied: the source lacks it, or the target refuses it; the message says why."""


class _GaveUp(Exception):
    """A transfer still failing after every attempt."""

    def __init__(self, attempts: int, last: BaseException) -> None:
        super().__init__(
            f"still failing after {attempts} attempts: {first_line(last) or type(last).__name__}"
        )


@dataclass
class Digest:
    """What streamed through: byte count and digests."""

    size: int
    md5: str
    sha256: str


class _Hashing:
    """The digests of one attempt's bytes as they stream, and how many went out of how many."""

    def __init__(self) -> None:
        self.size = -1
        self.counted = 0
        self.expected: str | None = None  # the MD5 the source's ETag stands for, when it is one
        self._md5 = hashlib.md5()
        self._sha256 = hashlib.sha256()

    def update(self, piece: bytes) -> None:
        self.counted += len(piece)
        if self.counted > self.size >= 0:
            raise TransferError(f"the download is longer than its {self.size} bytes")
        self._md5.update(piece)
        self._sha256.update(piece)

    def digest(self) -> Digest | None:
        """The digests, when every byte went through."""
        if self.size < 0 or self.counted != self.size:
            return None
        return Digest(self.size, self._md5.hexdigest(), self._sha256.hexdigest())


def _api_message(exc: StorageApiError) -> str:
    return f"{exc.code} {exc.error}: {exc.message}" if exc.error else f"{exc.code}: {exc.message}"


def md5_of_etag(etag: str | None) -> str | None:
    """The MD5 an ``eTag`` stands for, when it is a plain MD5 (not a multipart or mtime tag)."""
    match = _MD5_ETAG.match(etag or "")
    return match.group(1) if match else None


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, TransferError) or is_transient(exc)


class Transfers:
    """Copies objects from ``source`` to ``target`` and records them in the target database ``tconn``."""

    def __init__(
        self,
        source: StorageApi,
        target: StorageApi,
        tconn: asyncpg.Connection,
        report: StorageReport,
        *,
        run_id: int | None,
        settings: TransferSettings,
        progress: Progress | None = None,
    ) -> None:
        self.source = source
        self.target = target
        self.tconn = tconn
        self.report = report
        self.run_id = run_id
        self.settings = settings
        self.progress = progress
        self._db = asyncio.Lock()  # one target connection, shared by every transfer
        self._slots = asyncio.Semaphore(settings.concurrency)

    async def handle(self, batch: list[Wanted]) -> None:
        """Settle one batch: present objects are recorded, the others copied in parallel."""
        async with asyncio.TaskGroup() as group:
            for wanted in batch:
                group.create_task(self._settle(wanted))

    async def _settle(self, wanted: Wanted) -> None:
        if wanted.present:
            assert wanted.target is not None
            if wanted.rows:
                async with self._db, self.tconn.transaction():
                    await self._repoint(wanted)
            self.report.present(wanted.bucket, wanted.target.size)
            self._tell(1, 0)
            return
        async with self._slots:
            try:
                digest, landed = await self._copy(wanted)
            except (Refused, _GaveUp) as exc:
                await self._quarantine(wanted, str(exc))
                self.report.refused(wanted.key, str(exc))
                self._tell(1, 0)
                return
        async with self._db, self.tconn.transaction():
            await self._record(wanted, digest, landed)
            await self._repoint(wanted)
        self.report.copied(wanted.bucket, digest.size)
        self._tell(1, 0)

    def _tell(self, objects: int, size: int) -> None:
        if self.progress is not None:
            self.progress(objects, size)

    # -- one object ------------------------------------------------------------------------------

    async def _copy(self, wanted: Wanted) -> tuple[Digest, ObjectMeta]:
        """Stream the object until its content is on the target; raise Refused when it cannot be."""
        source = wanted.source
        if source is None:
            raise Refused(f"missing in the source: bucket {wanted.bucket} has no object {wanted.path}")
        last: _Hashing | None = None
        policy = retrying(
            _transient,
            attempts=self.settings.attempts,
            initial_wait=self.settings.initial_wait,
            max_wait=self.settings.max_wait,
            wait_hint=wait_hint,
            what=f"copy of {wanted.bucket}/{wanted.path}",
        )
        try:
            async for attempt in policy:
                with attempt:
                    if last is not None:
                        # The last attempt may have landed although its answer was lost: look first.
                        self.report.retries += 1
                        sent = last.digest()
                        earlier = await self._landed(wanted, sent.md5, sent.size) if sent else None
                        if sent is not None and earlier is not None:
                            return sent, earlier
                    last = _Hashing()
                    await self._stream(wanted, last)
                    digest = last.digest()
                    if digest is None:
                        raise TransferError(f"the upload ended after {last.counted} of {last.size} bytes")
                    if last.expected is not None and digest.md5 != last.expected:
                        raise TransferError(f"the download's MD5 {digest.md5} is not the source's eTag")
                    landed = await self._landed(wanted, digest.md5, digest.size)
                    if landed is None:
                        raise TransferError("the upload was answered, but the target does not hold the bytes")
                    return digest, landed
        except StorageApiError as exc:
            if exc.transient:
                raise _GaveUp(self.settings.attempts, exc) from exc
            raise Refused(_api_message(exc)) from exc
        except (TransferError, *_lost()) as exc:
            raise _GaveUp(self.settings.attempts, exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _landed(self, wanted: Wanted, md5: str, size: int) -> ObjectMeta | None:
        """The target's metadata when it holds ``size`` bytes whose eTag is ``md5`` (or no MD5 eTag)."""
        async with self._db:
            row = await self.tconn.fetchrow(
                "SELECT metadata, user_metadata FROM storage.objects WHERE bucket_id = $1 AND name = $2",
                wanted.bucket,
                wanted.target_path,
            )
        meta = ObjectMeta.from_row(row["metadata"], row["user_metadata"]) if row else None
        if meta is None or meta.size != size:
            return None
        target_md5 = md5_of_etag(meta.etag)
        return meta if target_md5 is None or target_md5 == md5 else None

    async def _stream(self, wanted: Wanted, hashing: _Hashing) -> None:
        """One attempt: download → upload, hashing on the way."""
        source = wanted.source
        assert source is not None
        async with self.source.download(wanted.bucket, wanted.path) as response:
            hashing.size = _declared_size(response, source.size)
            # The download's own ETag: the object may have changed since its metadata was read.
            hashing.expected = md5_of_etag(response.headers.get("ETag") or source.etag)
            upload = Upload(
                bucket=wanted.bucket,
                path=wanted.target_path,
                size=hashing.size,
                content_type=source.mimetype,
                cache_control=source.cache_control,
                user_metadata=source.user_metadata,
            )

            async def body() -> AsyncIterator[bytes]:
                async for piece in response.aiter_bytes(STREAM_CHUNK):
                    hashing.update(piece)
                    self._tell(0, len(piece))
                    yield piece
                if hashing.counted != hashing.size:
                    raise TransferError(f"the download ended after {hashing.counted} of {hashing.size} bytes")

            if hashing.size > self.settings.resumable_threshold:
                await self._resumable(upload, body())
            else:
                await self.target.upload(upload, body())

    async def _resumable(self, upload: Upload, body: AsyncIterator[bytes]) -> None:
        """Send through the TUS endpoint, one chunk buffered at a time; a failed chunk is resent from
        the offset the server says it holds."""
        chunk = self.settings.resumable_chunk
        location = await self.target.start_resumable(upload)
        buffer, offset = bytearray(), 0
        async for piece in body:
            buffer += piece
            while len(buffer) >= chunk:
                # Hand the full buffer over and keep only the overflow: no copy of the chunk itself.
                data, buffer = buffer, buffer[chunk:]
                del data[chunk:]
                offset = await self._send(location, offset, data)
        if buffer or offset < upload.size or upload.size == 0:
            await self._send(location, offset, buffer)

    async def _send(self, location: str, offset: int, data: bytearray) -> int:
        end = offset + len(data)
        policy = retrying(
            is_transient,
            attempts=self.settings.attempts,
            initial_wait=self.settings.initial_wait,
            max_wait=self.settings.max_wait,
            wait_hint=wait_hint,
            what=f"resumable upload chunk at byte {offset:,}",
        )
        held = offset
        async for attempt in policy:
            with attempt:
                if attempt.retry_state.attempt_number > 1:
                    self.report.retries += 1
                    now = await self.target.resumable_offset(location)
                    if now is None:
                        # The server forgot the upload: it completed (the last chunk's answer was lost),
                        # or it expired; the caller's check of the target tells which.
                        return end
                    if not offset <= now <= end:
                        raise TransferError(f"the resumable upload is at byte {now}, outside {offset}-{end}")
                    held = now
                    if held == end:
                        return end
                return await self.target.send_chunk(location, held, memoryview(data)[held - offset :])
        raise AssertionError("unreachable")  # pragma: no cover

    # -- state -----------------------------------------------------------------------------------

    async def _record(self, wanted: Wanted, digest: Digest, landed: ObjectMeta) -> None:
        assert wanted.source is not None
        await self.tconn.execute(
            "INSERT INTO _sync.storage_objects AS s (bucket, target_path, source_path, source_etag, size, "
            "target_etag, md5, sha256, run_id, landed_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, now()) "
            "ON CONFLICT (bucket, target_path) DO UPDATE SET source_path = EXCLUDED.source_path, "
            "source_etag = EXCLUDED.source_etag, size = EXCLUDED.size, target_etag = EXCLUDED.target_etag, "
            "md5 = EXCLUDED.md5, sha256 = EXCLUDED.sha256, run_id = EXCLUDED.run_id, landed_at = now()",
            wanted.bucket,
            wanted.target_path,
            wanted.path,
            wanted.source.etag,
            digest.size,
            landed.etag,
            digest.md5,
            digest.sha256,
            self.run_id,
        )
        await self.tconn.execute(
            "UPDATE _sync.quarantine SET resolved_at = now() "
            "WHERE table_name = $1 AND source_key = $2 AND resolved_at IS NULL",
            QUARANTINE_TABLE,
            wanted.key,
        )

    async def _repoint(self, wanted: Wanted) -> None:
        """Point the rows that still hold the source path at the object's target path."""
        rule = wanted.rule
        if rule is None or not wanted.rows:
            return
        status = await self.tconn.execute(
            f"UPDATE {table_ident(rule.table)} SET {ident(rule.column)} = $1 "
            f"WHERE {ident(rule.key)}::text = ANY($2::text[]) AND {ident(rule.column)} = $3",
            wanted.target_path,
            wanted.rows,
            wanted.path,
        )
        self.report.repointed += int(status.split()[-1])

    async def _quarantine(self, wanted: Wanted, message: str) -> None:
        row = {"bucket": wanted.bucket, "path": wanted.path, "target_path": wanted.target_path}
        if wanted.source is not None:
            row |= {"size": wanted.source.size, "mimetype": wanted.source.mimetype}
        log.warning("%s quarantined: %s", wanted.key, message)
        async with self._db:
            await self.tconn.execute(
                "INSERT INTO _sync.quarantine (run_id, table_name, source_key, row_data, error) "
                "VALUES ($1, $2, $3, $4::jsonb, $5) "
                "ON CONFLICT (table_name, source_key) WHERE resolved_at IS NULL DO UPDATE "
                "SET run_id = EXCLUDED.run_id, row_data = EXCLUDED.row_data, error = EXCLUDED.error, "
                "created_at = now()",
                self.run_id,
                QUARANTINE_TABLE,
                wanted.key,
                json.dumps(row),
                message,
            )


def _lost() -> tuple[type[Exception], ...]:
    """The transport's own failures: a connection lost or refused, a timeout."""
    import httpx

    return httpx.TransportError, httpx.TimeoutException


def _declared_size(response: httpx.Response, fallback: int) -> int:
    """The download's length: its ``Content-Length`` unless the body is content-encoded."""
    length = response.headers.get("Content-Length")
    if length is not None and not response.headers.get("Content-Encoding"):
        return int(length)
    return fallback
