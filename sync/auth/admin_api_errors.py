"""Admin-API failures: which are worth a retry, how long the server asked to wait, and one line for each."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx
from supabase_auth.errors import AuthApiError, AuthRetryableError, AuthUnknownError


def is_transient_api_error(exc: BaseException) -> bool:
    """True for admin-API failures worth retrying: 429, 5xx, timeouts and dropped connections."""
    if isinstance(exc, AuthRetryableError):
        return True
    if isinstance(exc, AuthApiError):
        return exc.status == 429 or exc.status >= 500
    if isinstance(exc, AuthUnknownError):  # a non-JSON answer, e.g. a gateway's text 429
        status = _http_status(exc)
        return status is not None and (status == 429 or status >= 500)
    return False


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status behind a client error: the client keeps it only on the httpx cause."""
    response = getattr(exc.__cause__, "response", None)
    return response.status_code if response is not None else None


def retry_after(exc: BaseException) -> float | None:
    """Seconds the server asked to wait (``Retry-After``: seconds or an HTTP date), else None."""
    response = getattr(exc.__cause__, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)


def is_transient_http_error(exc: BaseException) -> bool:
    """The same for a plain ``httpx`` request (the list filter): 429, 5xx and transport errors."""
    if isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
        return status == 429 or status >= 500
    return isinstance(exc, httpx.TransportError)


def http_retry_after(exc: BaseException) -> float | None:
    """:func:`retry_after` for a plain ``httpx`` status error."""
    if isinstance(exc, httpx.HTTPStatusError):
        carrier = Exception()
        carrier.__cause__ = exc
        return retry_after(carrier)
    return None


def api_message(exc: BaseException) -> str:
    """An admin-API failure in one line: status, error code and message, as far as known."""
    status = getattr(exc, "status", None) or _http_status(exc)
    code = getattr(exc, "code", None)
    text = getattr(exc, "message", None) or str(exc).strip() or type(exc).__name__
    return " ".join(str(part) for part in (status, code, text) if part)
