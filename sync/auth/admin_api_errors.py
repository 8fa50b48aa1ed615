"""Admin-API failures read from what the server answered, not from how a client release wraps it.

A failure is classified by the HTTP answer behind it: the one the request's own response hook recorded
(see :class:`Exchange`), else any ``httpx`` response the exception keeps on its chain (``__cause__``,
``__context__``, ``original_error``, ``response``). A request that was sent and never answered (a read
timeout, a dropped connection) is a transport failure, whatever the client turned it into.
"""

from __future__ import annotations

import json
from contextvars import ContextVar
from dataclasses import dataclass

import httpx

from sync.retry import retry_after_seconds

# A 401/403 after the credentials were accepted once is retried this many times before it stops the run
# (hosted projects answer an occasional bad_jwt while keys rotate).
KEY_REFUSALS_RETRIED = 3


@dataclass
class Exchange:
    """What the current admin-API call saw on the wire: whether a request left, and the last answer."""

    sent: bool = False
    response: httpx.Response | None = None


current_exchange: ContextVar[Exchange | None] = ContextVar("admin_api_exchange", default=None)


async def record_request(request: httpx.Request) -> None:
    """``httpx`` request hook: a request of the current call left."""
    if (exchange := current_exchange.get()) is not None:
        exchange.sent, exchange.response = True, None


async def record_response(response: httpx.Response) -> None:
    """``httpx`` response hook: keep the answer (its body read, for the error code) for classification."""
    if (exchange := current_exchange.get()) is not None:
        if response.status_code >= 400:
            await response.aread()
        exchange.response = response


@dataclass(frozen=True, slots=True)
class ApiFailure:
    """One failed admin-API call: status and error code when the server answered, else a transport failure."""

    status: int | None
    code: str | None
    message: str
    retry_after: float | None = None
    transport: bool = False

    @property
    def transient(self) -> bool:
        """Worth a retry: 429, 5xx, or no answer at all."""
        return self.transport or self.status == 429 or (self.status or 0) >= 500

    @property
    def refused_key(self) -> bool:
        """The server refused the credentials (401/403)."""
        return self.status in (401, 403)

    def line(self) -> str:
        """The failure in one line: status, error code and message, as far as known."""
        return " ".join(str(part) for part in (self.status, self.code, self.message) if part)


class ApiCallError(Exception):
    """An admin-API call failed; ``failure`` says how, read from the answer."""

    def __init__(self, failure: ApiFailure) -> None:
        super().__init__(failure.line())
        self.failure = failure


def failure_of(exc: BaseException, exchange: Exchange | None = None) -> ApiFailure:
    """Classify ``exc`` by the answer ``exchange`` recorded, else by whatever answer its chain keeps."""
    if isinstance(exc, ApiCallError):
        return exc.failure
    chain = _chain(exc)
    response = exchange.response if exchange is not None else None
    if response is None:
        response = next((r for r in map(_response_of, chain) if r is not None), None)
    message = _message(exc)
    if response is not None:
        code, text = _error_body(response)
        return ApiFailure(response.status_code, code, text or message, _retry_after(response))
    status = next(
        (s for s in (getattr(e, "status", None) for e in chain) if isinstance(s, int) and s > 0), None
    )
    code = next((c for c in (getattr(e, "code", None) for e in chain) if isinstance(c, str) and c), None)
    unanswered = exchange is not None and exchange.sent
    transport = unanswered or any(isinstance(e, httpx.TransportError) for e in chain)
    # Client releases that wrap a dropped connection name it "retryable" with status 0.
    transport = transport or any(type(e).__name__ == "AuthRetryableError" for e in chain)
    return ApiFailure(status, code, message, None, transport and status is None)


def is_transient_api_error(exc: BaseException) -> bool:
    """True for admin-API failures worth retrying: 429, 5xx, timeouts and dropped connections."""
    return failure_of(exc).transient


def retry_after(exc: BaseException) -> float | None:
    """Seconds the server asked to wait (``Retry-After``: seconds or an HTTP date), else None."""
    return failure_of(exc).retry_after


def api_message(exc: BaseException) -> str:
    """An admin-API failure in one line: status, error code and message, as far as known."""
    return failure_of(exc).line()


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and every exception it keeps a reference to, nearest first, each once."""
    seen: list[BaseException] = []
    queue: list[object] = [exc]
    while queue and len(seen) < 16:
        item = queue.pop(0)
        if not isinstance(item, BaseException) or any(item is s for s in seen):
            continue
        seen.append(item)
        queue += [item.__cause__, item.__context__, getattr(item, "original_error", None)]
    return seen


def _response_of(exc: BaseException) -> httpx.Response | None:
    try:
        response = getattr(exc, "response", None)
    except RuntimeError:  # httpx raises when a request error has no response attached
        return None
    return response if isinstance(response, httpx.Response) else None


def _error_body(response: httpx.Response) -> tuple[str | None, str | None]:
    """The error code and message of an Auth error body (2024-01-01 or initial format), if JSON."""
    try:
        body = json.loads(response.content or b"null")
    except (ValueError, httpx.ResponseNotRead):
        return None, None
    if not isinstance(body, dict):
        return None, None
    code = body.get("error_code") or body.get("code")
    text = body.get("msg") or body.get("message") or body.get("error_description") or body.get("error")
    return (code if isinstance(code, str) else None), (text if isinstance(text, str) else None)


def _retry_after(response: httpx.Response) -> float | None:
    return retry_after_seconds(response.headers.get("retry-after"))


def _message(exc: BaseException) -> str:
    text = getattr(exc, "message", None)
    if not isinstance(text, str) or not text.strip():
        text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
