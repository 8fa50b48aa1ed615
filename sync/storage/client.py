"""HTTP to one project's Storage API with its service-role key: buckets, streamed downloads and uploads.

The ``supabase`` package's storage client buffers whole files (``download`` returns bytes, ``upload``
takes bytes or a file), so transfers go through ``httpx`` directly: a download is an open response read
in chunks, an upload's body is an async iterator of chunks with its ``Content-Length`` given, and large
files go through the TUS resumable endpoint in chunks of one bounded buffer. Nothing ever holds a whole
file.

Failures are typed: :class:`StorageApiError` carries the server's code (the ``statusCode`` of its body,
which is what the Storage server's errors say even when the HTTP status is 400) and knows whether the
same request may succeed later (429, 5xx, the database's own timeouts and connection limits). Calls
that are safe to repeat are retried here, with backoff and jitter, honouring ``Retry-After``; transfers
are retried by the caller, which must first find out whether an interrupted upload landed.
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

from sync.retry import retry_after_seconds, retrying

if TYPE_CHECKING:
    import httpx  # loaded when a client is made: only runs that move files need it

T = TypeVar("T")

TUS_CHUNK = 6 * 1024 * 1024
"""The chunk size Supabase asks resumable uploads to use (every PATCH but the last carries exactly this)."""
STREAM_CHUNK = 256 * 1024
DEFAULT_TIMEOUT = {"connect": 15.0, "read": 120.0, "write": 120.0, "pool": None}
"""Seconds per phase of a request (``httpx.Timeout``'s): none to wait for a free connection."""

# Codes in an error body that a later attempt may not meet: rate limits, server and gateway failures,
# the database's own timeout (544) and lock timeouts (423, 503).
_TRANSIENT_CODES = frozenset({"423", "429", "500", "502", "503", "504", "544"})


class StorageApiError(Exception):
    """A Storage API error answer: HTTP status, the code of the body, its ``error`` and ``message``."""

    def __init__(self, http_status: int, code: str, error: str, message: str, retry_after: float | None):
        super().__init__(f"{code} {error}: {message}" if error and error != code else f"{code}: {message}")
        self.http_status = http_status
        self.code = code
        self.error = error
        self.message = message
        self.retry_after = retry_after

    @property
    def transient(self) -> bool:
        """True when the same request may succeed later."""
        return self.http_status == 429 or self.http_status >= 500 or self.code in _TRANSIENT_CODES

    @property
    def not_found(self) -> bool:
        """The object (or bucket) does not exist."""
        return self.code == "404"

    @classmethod
    async def from_response(cls, response: httpx.Response) -> StorageApiError:
        """Parse an error answer: the server's JSON body, or a gateway's text or HTML."""
        raw = await response.aread()
        code, error, message = str(response.status_code), "", raw.decode("utf-8", "replace").strip()[:200]
        with contextlib.suppress(ValueError, AttributeError):
            body = json.loads(raw)
            code = str(body.get("statusCode") or code)
            error = str(body.get("error") or body.get("code") or "")
            message = str(body.get("message") or message)
        return cls(response.status_code, code, error, message, retry_after(response))


def retry_after(response: httpx.Response) -> float | None:
    """The ``Retry-After`` header in seconds (delta-seconds or an HTTP date), if any."""
    return retry_after_seconds(response.headers.get("Retry-After"))


def is_transient(exc: BaseException) -> bool:
    """True for failures a retry may cure: transient API errors, timeouts, lost or refused connections."""
    if isinstance(exc, StorageApiError):
        return exc.transient
    import httpx

    return isinstance(exc, (httpx.TimeoutException, httpx.TransportError))


def wait_hint(exc: BaseException) -> float | None:
    """The server's own delay for a retry (``Retry-After``), if it gave one."""
    return exc.retry_after if isinstance(exc, StorageApiError) else None


@dataclass(frozen=True)
class Bucket:
    """A bucket's settings, as both the API and ``storage.buckets`` describe them."""

    id: str
    public: bool
    file_size_limit: int | None
    allowed_mime_types: tuple[str, ...] | None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Bucket:
        mimes = data.get("allowed_mime_types")
        return cls(
            id=str(data["id"]),
            public=bool(data.get("public")),
            file_size_limit=data.get("file_size_limit"),
            allowed_mime_types=tuple(mimes) if mimes else None,
        )


@dataclass(frozen=True)
class Upload:
    """What to write: the object's place, its content headers and its user metadata."""

    bucket: str
    path: str
    size: int
    content_type: str
    cache_control: str | None
    user_metadata: dict[str, Any] | None


class StorageApi:
    """One project's Storage API (``<url>/storage/v1``) with its service-role key.

    ``side`` names the project in messages and logs. ``attempts`` bounds the tries of calls retried
    here (bucket reads and creation); ``max_wait`` caps a wait between them.
    """

    def __init__(
        self,
        url: str,
        service_key: str,
        *,
        side: str,
        attempts: int = 6,
        initial_wait: float = 0.5,
        max_wait: float = 30.0,
        timeout: float | None = None,
        connections: int = 16,
    ) -> None:
        import httpx

        self.base = url.rstrip("/") + "/storage/v1"
        self.side = side
        self.attempts = attempts
        self.initial_wait = initial_wait
        self.max_wait = max_wait
        self.http = httpx.AsyncClient(
            headers={"Authorization": f"Bearer {service_key}", "apikey": service_key},
            timeout=httpx.Timeout(timeout) if timeout is not None else httpx.Timeout(**DEFAULT_TIMEOUT),
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        )

    async def close(self) -> None:
        """Close the connections."""
        await self.http.aclose()

    async def __aenter__(self) -> StorageApi:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def object_url(self, bucket: str, path: str, kind: str = "") -> str:
        """The URL of an object (``kind``: ``""``, ``"info/"``); every path segment is percent-encoded."""
        return f"{self.base}/object/{kind}{quote(bucket, safe='')}/{quote(path, safe='/')}"

    async def retried(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Run ``call`` with this API's retry policy, logging each retry with ``what``."""
        policy = retrying(
            is_transient,
            attempts=self.attempts,
            initial_wait=self.initial_wait,
            max_wait=self.max_wait,
            wait_hint=wait_hint,
            what=f"{self.side} Storage: {what}",
        )
        async for attempt in policy:
            with attempt:
                return await call()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _checked(self, response: httpx.Response) -> httpx.Response:
        if response.status_code >= 300:
            raise await StorageApiError.from_response(response)
        return response

    # -- buckets ---------------------------------------------------------------------------------

    async def get_bucket(self, bucket: str) -> Bucket | None:
        """The bucket's settings, or None when it does not exist."""

        async def call() -> Bucket | None:
            response = await self.http.get(f"{self.base}/bucket/{quote(bucket, safe='')}")
            try:
                await self._checked(response)
            except StorageApiError as exc:
                if exc.not_found:
                    return None
                raise
            return Bucket.from_json(response.json())

        return await self.retried(f"read bucket {bucket}", call)

    async def create_bucket(self, settings: Bucket) -> None:
        """Create a bucket with ``settings``; one that appeared meanwhile (a lost answer) is fine."""

        async def call() -> None:
            body = {
                "id": settings.id,
                "name": settings.id,
                "public": settings.public,
                "file_size_limit": settings.file_size_limit,
                "allowed_mime_types": list(settings.allowed_mime_types or []) or None,
            }
            try:
                await self._checked(await self.http.post(f"{self.base}/bucket", json=body))
            except StorageApiError as exc:
                if exc.code != "409":
                    raise

        await self.retried(f"create bucket {settings.id}", call)

    # -- objects ---------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def download(self, bucket: str, path: str) -> AsyncIterator[httpx.Response]:
        """An open download of the object: read it with ``aiter_bytes``; not retried here."""
        request = self.http.build_request("GET", self.object_url(bucket, path))
        response = await self.http.send(request, stream=True)
        try:
            await self._checked(response)
            yield response
        finally:
            await response.aclose()

    async def upload(self, upload: Upload, body: AsyncIterator[bytes], *, upsert: bool = True) -> None:
        """One POST with the body streamed from ``body`` (``upload.size`` bytes); not retried here."""
        headers = {
            "Content-Type": upload.content_type,
            "Content-Length": str(upload.size),
            "x-upsert": "true" if upsert else "false",
        }
        if upload.cache_control:
            headers["Cache-Control"] = upload.cache_control
        if upload.user_metadata is not None:
            headers["x-metadata"] = base64.b64encode(json.dumps(upload.user_metadata).encode()).decode()
        response = await self.http.post(
            self.object_url(upload.bucket, upload.path), content=body, headers=headers
        )
        await self._checked(response)

    async def start_resumable(self, upload: Upload, *, upsert: bool = True) -> str:
        """Create a TUS upload for ``upload`` and return its URL."""

        def b64(text: str) -> str:
            return base64.b64encode(text.encode()).decode()

        meta = {"bucketName": upload.bucket, "objectName": upload.path, "contentType": upload.content_type}
        if upload.cache_control:
            meta["cacheControl"] = upload.cache_control.removeprefix("max-age=")
        if upload.user_metadata is not None:
            meta["metadata"] = json.dumps(upload.user_metadata)
        headers = {
            "Tus-Resumable": "1.0.0",
            "Upload-Length": str(upload.size),
            "Upload-Metadata": ",".join(f"{k} {b64(v)}" for k, v in meta.items()),
            "x-upsert": "true" if upsert else "false",
        }
        response = await self._checked(await self.http.post(f"{self.base}/upload/resumable", headers=headers))
        location = response.headers.get("Location", "")
        return location if location.startswith("http") else self.base.split("/storage/v1")[0] + location

    async def resumable_offset(self, location: str) -> int | None:
        """How many bytes of a TUS upload the server holds, or None when it no longer knows the upload."""
        response = await self.http.head(location, headers={"Tus-Resumable": "1.0.0"})
        if response.status_code >= 300:
            error = await StorageApiError.from_response(response)
            if error.not_found or response.status_code in (404, 410):
                return None
            raise error
        return int(response.headers["Upload-Offset"])

    async def send_chunk(self, location: str, offset: int, chunk: memoryview) -> int:
        """PATCH ``chunk`` at ``offset``, streamed from the caller's buffer; returns the new offset."""
        headers = {
            "Tus-Resumable": "1.0.0",
            "Upload-Offset": str(offset),
            "Content-Type": "application/offset+octet-stream",
            "Content-Length": str(len(chunk)),
        }

        async def pieces() -> AsyncIterator[bytes]:
            for start in range(0, len(chunk), STREAM_CHUNK):
                yield bytes(chunk[start : start + STREAM_CHUNK])

        response = await self._checked(await self.http.patch(location, content=pieces(), headers=headers))
        return int(response.headers.get("Upload-Offset", offset + len(chunk)))
