"""A local stand-in for the Supabase Auth admin user endpoints, backed by a real Supabase-shaped database.

It serves ``/auth/v1/admin/users[/{id}]`` over plain HTTP/1.1 on 127.0.0.1 and answers the way the Auth
server (github.com/supabase/auth, ``internal/api/admin.go``) answers: the same order of checks, the same
status codes, error codes and error body formats, and the same rows written into ``auth.users`` and
``auth.identities`` (plus the audit row) in one transaction, so that triggers on ``auth.users`` fire as
they would behind the real server. The ``supabase`` Python client talks to it unchanged.

On top of that it can misbehave on purpose (:class:`Faults`): rate limits, gateway errors, slow answers
and the two cases that breed duplicates under blind retries, "commit, then answer 504" and "commit, then
drop the connection".

Usage::

    async with AdminApiServer(db.url) as server:
        client = await acreate_client(server.url, server.service_key, options=...)
        await client.auth.admin.create_user({...})
        assert server.creates == 1
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
import random
import re
import secrets
import string
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import asyncpg
import bcrypt
from aiohttp import web

from devkit.scenario import obfuscated, soft_deleted_columns
from tests.local_http import LocalHttpService

_log = logging.getLogger(__name__)

PREFIX = "/auth/v1"
NIL_UUID = uuid.UUID(int=0)
DEFAULT_AUD = "authenticated"
DEFAULT_ROLE = "authenticated"  # GOTRUE_JWT_DEFAULT_GROUP_NAME on hosted projects
ADMIN_ROLES = frozenset({"service_role", "supabase_admin"})  # GOTRUE_JWT_ADMIN_ROLES default
API_VERSION_HEADER = "X-Supabase-Api-Version"
API_VERSION_2024_01_01 = "2024-01-01"
MAX_BODY_BYTES = 1_048_576  # Auth caps request bodies at 1 MiB (http.MaxBytesReader)
PASSWORD_MIN_LENGTH = 6  # GOTRUE_PASSWORD_MIN_LENGTH default
DUPLICATE_EMAIL_MSG = "A user with this email address has already been registered"
DUPLICATE_PHONE_MSG = "Phone number already registered by another user"

# Postgres error classes that Auth shows verbatim in the legacy (unversioned) error format.
_PUBLIC_SQLSTATES = frozenset({"P0001", "23000", "23001", "23502", "23503", "23505", "23514", "23P01"})

# badoux/checkmail's format check, which Auth's validateEmail uses.
_EMAIL_RE = re.compile(
    r"[a-zA-Z0-9.!#$%&'*+/=?^_`{|}~-]+@[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
    r"(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)*"
)
_E164_RE = re.compile(r"[1-9][0-9]{1,14}")
_BEARER_RE = re.compile(r"(?i:bearer) (\S+)")
_HEX = "[0-9a-fA-F]"
# The spellings gofrs/uuid.FromString accepts: canonical, braced, urn-prefixed and bare hex.
_UUID_RE = re.compile(
    rf"(?:urn:uuid:)?(\{{)?{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}(?(1)\}})"
    rf"|{_HEX}{{32}}"
)
_BCRYPT_RE = re.compile(r"\$2[aby]?\$([0-9]{2})\$")
_ARGON2_RE = re.compile(
    r"\$(?P<alg>argon2(?:d|i|id))\$v=(?P<v>16|19)\$m=(?P<m>[0-9]+),t=(?P<t>[0-9]+),p=(?P<p>[0-9]+)"
    r"(?:,keyid=(?P<keyid>[^,$]+))?(?:,data=(?P<data>[^$]+))?\$(?P<salt>[^$]*)\$(?P<hash>.*)"
)
_FBSCRYPT_RE = re.compile(
    r"\$fbscrypt\$v=(?P<v>[0-9]+),n=(?P<n>[0-9]+),r=(?P<r>[0-9]+),p=(?P<p>[0-9]+)"
    r"(?:,ss=(?P<ss>[^,$]+))?(?:,sk=(?P<sk>[^$]+))?\$(?P<salt>[^$]+)\$(?P<hash>.+)"
)
_DURATION_UNITS_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # U+00B5
    "μs": 1_000,  # U+03BC
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}

# JSON fields of Auth's AdminUserParams and the Go type each one decodes into.
_ADMIN_PARAMS: dict[str, str] = {
    "id": "string",
    "aud": "string",
    "role": "string",
    "email": "string",
    "phone": "string",
    "password": "*string",
    "password_hash": "string",
    "email_confirm": "bool",
    "phone_confirm": "bool",
    "user_metadata": "map",
    "app_metadata": "map",
    "ban_duration": "string",
}
_DELETE_PARAMS: dict[str, str] = {"should_soft_delete": "bool"}

# auth.users columns written on insert, in table order; confirmed_at (generated) and is_super_admin
# (not mapped by Auth) are left out, as the Auth server leaves them out.
_USER_INSERT_COLUMNS = (
    "instance_id",
    "id",
    "aud",
    "role",
    "email",
    "encrypted_password",
    "email_confirmed_at",
    "invited_at",
    "confirmation_token",
    "confirmation_sent_at",
    "recovery_token",
    "recovery_sent_at",
    "email_change_token_new",
    "email_change",
    "email_change_sent_at",
    "last_sign_in_at",
    "raw_app_meta_data",
    "raw_user_meta_data",
    "created_at",
    "updated_at",
    "phone",
    "phone_confirmed_at",
    "phone_change",
    "phone_change_token",
    "phone_change_sent_at",
    "email_change_token_current",
    "email_change_confirm_status",
    "banned_until",
    "reauthentication_token",
    "reauthentication_sent_at",
    "is_sso_user",
    "deleted_at",
    "is_anonymous",
)
_JSON_COLUMNS = frozenset({"raw_app_meta_data", "raw_user_meta_data"})


# --------------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------------

# Answered before the request reaches Auth, as a gateway or an overloaded server would.
FAULT_RATE_LIMIT_JSON = "rate_limit_json"  # 429 JSON over_request_rate_limit
FAULT_RATE_LIMIT_TEXT = "rate_limit_text"  # 429 text body with Retry-After
FAULT_RATE_LIMIT_TEXT_BARE = "rate_limit_text_bare"  # 429 text body without Retry-After
FAULT_SERVER_ERROR = "server_error"  # 500 JSON unexpected_failure
FAULT_BAD_GATEWAY = "bad_gateway"  # 502 HTML
FAULT_SERVICE_UNAVAILABLE = "service_unavailable"  # 503 text
FAULT_GATEWAY_TIMEOUT = "gateway_timeout"  # 504 text
# Delays, then handles the request normally: the write lands after the client gave up.
FAULT_SLOW = "slow"
# Handle the request (the create commits), then hide the outcome.
FAULT_COMMIT_THEN_504 = "commit_then_504"
FAULT_COMMIT_THEN_DROP = "commit_then_drop"
# A 403 bad_jwt for a key that is good: hosted projects answer it now and then while keys rotate.
FAULT_BAD_JWT = "bad_jwt"

FAULT_KINDS = (
    FAULT_RATE_LIMIT_JSON,
    FAULT_RATE_LIMIT_TEXT,
    FAULT_RATE_LIMIT_TEXT_BARE,
    FAULT_SERVER_ERROR,
    FAULT_BAD_GATEWAY,
    FAULT_SERVICE_UNAVAILABLE,
    FAULT_GATEWAY_TIMEOUT,
    FAULT_SLOW,
    FAULT_COMMIT_THEN_504,
    FAULT_COMMIT_THEN_DROP,
    FAULT_BAD_JWT,
)
_BEFORE_HANDLING = frozenset((*FAULT_KINDS[:7], FAULT_BAD_JWT))

# Route names faults can be aimed at.
ROUTE_CREATE = "create"  # POST /admin/users
ROUTE_LIST = "list"  # GET /admin/users
ROUTE_GET = "get"  # GET /admin/users/{id}
ROUTE_UPDATE = "update"  # PUT /admin/users/{id}
ROUTE_DELETE = "delete"  # DELETE /admin/users/{id}
ROUTES = (ROUTE_CREATE, ROUTE_LIST, ROUTE_GET, ROUTE_UPDATE, ROUTE_DELETE)


@dataclass
class Faults:
    """Seeded, per-request fault injection for the routes named in ``routes`` (default: create only).

    Each probability is the chance that one request on a targeted route gets that fault; one random
    draw per request picks at most one fault, so the probabilities must add up to at most 1. ``script``
    is consumed first, one entry per targeted request (``None`` = no fault), which makes a test fully
    deterministic. ``max_faults`` bounds the total, so a retrying client eventually gets through.
    ``injected`` counts what was applied, by kind.
    """

    seed: int = 0
    routes: frozenset[str] = frozenset({ROUTE_CREATE})
    rate_limit_json: float = 0.0
    rate_limit_text: float = 0.0
    rate_limit_text_bare: float = 0.0
    server_error: float = 0.0
    bad_gateway: float = 0.0
    service_unavailable: float = 0.0
    gateway_timeout: float = 0.0
    slow: float = 0.0
    commit_then_504: float = 0.0
    commit_then_drop: float = 0.0
    bad_jwt: float = 0.0
    script: list[str | None] = field(default_factory=list)
    max_faults: int | None = None
    retry_after: str = "1"  # the Retry-After value of the text 429
    delay_seconds: float = 6.0  # the "slow" delay: above httpx's default 5 s timeout
    injected: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.routes = frozenset(self.routes)
        unknown_routes = self.routes - set(ROUTES)
        if unknown_routes:
            raise ValueError(f"unknown routes {sorted(unknown_routes)}; known: {ROUTES}")
        for kind in self.script:
            if kind is not None and kind not in FAULT_KINDS:
                raise ValueError(f"unknown fault {kind!r} in script; known: {FAULT_KINDS}")
        for kind in FAULT_KINDS:
            if not 0.0 <= getattr(self, kind) <= 1.0:
                raise ValueError(f"probability {kind} must be within [0, 1]")
        if sum(getattr(self, kind) for kind in FAULT_KINDS) > 1.0 + 1e-9:
            raise ValueError("fault probabilities add up to more than 1")
        self._rng = random.Random(self.seed)
        self._script = list(self.script)

    @property
    def total(self) -> int:
        """How many faults were injected so far."""
        return sum(self.injected.values())

    def draw(self, route: str) -> str | None:
        """Pick the fault for one request on ``route`` (or ``None``) and count it."""
        if route not in self.routes:
            return None
        if self.max_faults is not None and self.total >= self.max_faults:
            return None
        if self._script:
            kind = self._script.pop(0)
        else:
            # Always one draw per targeted request, so a seed replays the same sequence.
            roll = self._rng.random()
            kind = None
            edge = 0.0
            for candidate in FAULT_KINDS:
                edge += getattr(self, candidate)
                if roll < edge:
                    kind = candidate
                    break
        if kind is not None:
            self.injected[kind] += 1
        return kind


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answer of the Auth server: status, error code, message, and what caused it."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        cause: BaseException | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.cause = cause
        self.extra = dict(extra or {})


def _internal(message: str, cause: BaseException | None = None) -> ApiError:
    return ApiError(500, "unexpected_failure", message, cause=cause)


def _api_version(request: web.Request) -> str | None:
    """The API version the request asked for, as Auth resolves it: ``2024-01-01`` or None (initial)."""
    raw = request.headers.get(API_VERSION_HEADER, "")
    if not raw:
        return None
    try:
        asked = datetime.strptime(raw, "%Y-%m-%d")
    except ValueError:
        return None  # Auth logs a warning and falls back to the initial version
    return API_VERSION_2024_01_01 if asked >= datetime(2024, 1, 1) else None


def error_response(request: web.Request, err: ApiError) -> web.Response:
    """Render ``err`` the way Auth's HandleResponseError does for this request's API version."""
    headers = {"x-sb-error-code": err.code}
    version = _api_version(request)
    if version is not None:
        headers[API_VERSION_HEADER] = version
        body: dict[str, Any] = {"code": err.code, "message": err.message, **err.extra}
        return web.json_response(body, status=err.status, headers=headers)
    pg = err.cause if isinstance(err.cause, asyncpg.PostgresError) else None
    sqlstate = getattr(pg, "sqlstate", None) or ""
    if pg is not None and (sqlstate in _PUBLIC_SQLSTATES or sqlstate.startswith("PT")):
        # Legacy clients get integrity and RAISE errors from Postgres as they are.
        status = 500
        if sqlstate.startswith("PT") and sqlstate[2:].isdigit():
            status = int(sqlstate[2:])
        body = {"code": sqlstate, "message": pg.args[0] if pg.args else str(pg)}
        for key in ("hint", "detail"):
            value = getattr(pg, key, None)
            if value:
                body[key] = value
        return web.json_response(body, status=status, headers=headers)
    body = {"code": err.status, "error_code": err.code, "msg": err.message, **err.extra}
    if err.status >= 500:
        body["error_id"] = str(uuid.uuid4())
    return web.json_response(body, status=err.status, headers=headers)


# --------------------------------------------------------------------------------------------------
# Request decoding and validation, as Auth does it
# --------------------------------------------------------------------------------------------------


def _go_type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid character {name!r} looking for beginning of value")


def decode_params(body: bytes, fields: Mapping[str, str], struct: str) -> dict[str, Any]:
    """Decode a JSON body into ``fields`` the way Go's ``json.Unmarshal`` fills Auth's param structs.

    Unknown keys are dropped, keys match case-insensitively, ``null`` leaves a value unset, and a value
    of the wrong JSON type (or broken JSON) is a 400 ``bad_json``.
    """
    try:
        data = json.loads(body.decode("utf-8") if body else "", parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        detail = "unexpected end of JSON input" if not body.strip() else str(exc)
        raise ApiError(400, "bad_json", f"Could not parse request body as JSON: {detail}") from exc
    out: dict[str, Any] = {}
    if data is None:
        return out
    if not isinstance(data, dict):
        raise ApiError(
            400,
            "bad_json",
            "Could not parse request body as JSON: json: cannot unmarshal "
            f"{_go_type_name(data)} into Go value of type api.{struct}",
        )
    first_error: str | None = None
    folded = {name.lower(): name for name in fields}
    for key, value in data.items():
        name = key if key in fields else folded.get(key.lower())
        if name is None:
            continue
        kind = fields[name]
        if value is None:
            if kind in ("*string", "map"):
                out[name] = None
            continue
        ok = {
            "string": isinstance(value, str),
            "*string": isinstance(value, str),
            "bool": isinstance(value, bool),
            "map": isinstance(value, dict),
        }[kind]
        if not ok:
            go_kind = {"string": "string", "*string": "string", "bool": "bool"}.get(
                kind, "map[string]interface {}"
            )
            first_error = first_error or (
                f"json: cannot unmarshal {_go_type_name(value)} into Go struct field "
                f"{struct}.{name} of type {go_kind}"
            )
            continue
        out[name] = value
    if first_error is not None:
        raise ApiError(400, "bad_json", f"Could not parse request body as JSON: {first_error}")
    return out


def validate_email(email: str) -> str:
    """Auth's validateEmail: required, at most 255 characters, checkmail format; returns it lower-cased."""
    if not email:
        raise ApiError(400, "validation_failed", "An email address is required")
    if len(email) > 255:
        raise ApiError(400, "validation_failed", "An email address is too long")
    if not _EMAIL_RE.fullmatch(email):
        raise ApiError(400, "validation_failed", "Unable to validate email address: invalid format")
    return email.lower()


def validate_phone(phone: str) -> str:
    """Auth's validatePhone: drop a leading ``+`` and all spaces, then E.164 digits (2 to 15, no 0 first)."""
    digits = phone.removeprefix("+").replace(" ", "")
    if not _E164_RE.fullmatch(digits):
        raise ApiError(400, "validation_failed", "Invalid phone number format (E.164 required)")
    return digits


def parse_uuid(text: str) -> uuid.UUID | None:
    """Parse ``text`` as gofrs/uuid.FromString does; None when it is not a UUID."""
    if not _UUID_RE.fullmatch(text):
        return None
    return uuid.UUID(text)


def parse_go_duration(text: str) -> timedelta:
    """Parse a Go ``time.ParseDuration`` string (``"24h"``, ``"1h30m"``, ``"-1.5s"``)."""
    original = text
    sign = 1
    if text and text[0] in "+-":
        sign = -1 if text[0] == "-" else 1
        text = text[1:]
    if text == "0":
        return timedelta(0)
    if not text:
        raise ValueError(f'time: invalid duration "{original}"')
    total_ns = 0.0
    pos = 0
    while pos < len(text):
        match = re.match(r"([0-9]*)(?:\.([0-9]*))?", text[pos:])
        whole, frac = (match.group(1), match.group(2)) if match else ("", None)
        if not whole and not frac:
            raise ValueError(f'time: invalid duration "{original}"')
        pos += match.end() if match else 0
        unit_match = re.match(r"[^0-9.]+", text[pos:])
        if unit_match is None:
            raise ValueError(f'time: missing unit in duration "{original}"')
        unit = unit_match.group(0)
        if unit not in _DURATION_UNITS_NS:
            raise ValueError(f'time: unknown unit "{unit}" in duration "{original}"')
        pos += unit_match.end()
        value = float(f"{whole or '0'}.{frac or '0'}")
        total_ns += value * _DURATION_UNITS_NS[unit]
    return timedelta(microseconds=sign * total_ns / 1_000)


def _b64_ok(text: str, *, padded: bool) -> bool:
    if not padded:
        if "=" in text:
            return False
        text += "=" * (-len(text) % 4)
    try:
        base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def _argon2_ok(value: str) -> bool:
    match = _ARGON2_RE.fullmatch(value)
    if match is None:
        return False
    if match["alg"] not in ("argon2i", "argon2id") or match["v"] != "19":
        return False
    if match["keyid"] or match["data"]:
        return False
    if int(match["m"]) > 1_048_576 or int(match["t"]) > 20 or int(match["p"]) > 16:
        return False
    salt, digest = match["salt"], match["hash"]
    return bool(salt) and bool(digest) and _b64_ok(salt, padded=False) and _b64_ok(digest, padded=False)


def _fbscrypt_ok(value: str) -> bool:
    match = _FBSCRYPT_RE.fullmatch(value)
    if match is None or match["v"] != "1":
        return False
    if min(int(match["n"]), int(match["r"]), int(match["p"])) <= 0 or int(match["n"]) >= 32:
        return False
    parts = [match["salt"], match["hash"]] + [match[k] for k in ("ss", "sk") if match[k]]
    return all(_b64_ok(part, padded=True) for part in parts)


def password_hash_accepted(value: str) -> bool:
    """Whether Auth's NewUserWithPasswordHash accepts ``value`` (argon2i/id, fbscrypt, else bcrypt)."""
    if value.startswith("$argon2"):
        return _argon2_ok(value)
    if value.startswith("$fbscrypt"):
        return _fbscrypt_ok(value)
    # bcrypt.Cost only parses the prefix: length, version, two-digit cost in 4..31.
    match = _BCRYPT_RE.match(value)
    return len(value) >= 59 and match is not None and 4 <= int(match.group(1)) <= 31


def _hash_password(password: str, cost: int = 10) -> str:
    # Auth hashes with golang.org/x/crypto/bcrypt at the default cost 10, which writes the $2a$ prefix.
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=cost, prefix=b"2a")).decode()


def _random_password() -> str:
    # Auth generates 64 characters (10 of them digits, no symbols) when no password is given.
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(64))


# --------------------------------------------------------------------------------------------------
# JSON shapes of users and identities
# --------------------------------------------------------------------------------------------------


def go_time(value: datetime | None) -> str | None:
    """Format a timestamp as Go's RFC 3339 with trailing fractional zeros trimmed, in UTC."""
    if value is None:
        return None
    value = value.astimezone(UTC)
    text = value.strftime("%Y-%m-%dT%H:%M:%S")
    if value.microsecond:
        text += f".{value.microsecond:06d}".rstrip("0")
    return text + "Z"


def identity_json(identity: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON of one identity (``identity_id`` is the row id, ``id`` the provider id)."""
    out: dict[str, Any] = {
        "identity_id": str(identity["id"]),
        "id": identity["provider_id"],
        "user_id": str(identity["user_id"]),
    }
    if identity.get("identity_data"):  # omitempty: an empty map is left out
        out["identity_data"] = identity["identity_data"]
    out["provider"] = identity["provider"]
    if identity.get("last_sign_in_at") is not None:
        out["last_sign_in_at"] = go_time(identity["last_sign_in_at"])
    out["created_at"] = go_time(identity["created_at"])
    out["updated_at"] = go_time(identity["updated_at"])
    if identity.get("email"):
        out["email"] = identity["email"]
    return out


def user_json(user: Mapping[str, Any], identities: list[Mapping[str, Any]] | None) -> dict[str, Any]:
    """The JSON of a user, field by field as Auth's ``models.User`` marshals it.

    Optional timestamps are left out when unset (``omitempty``); ``confirmed_at`` appears only when the
    mapping has it, i.e. for users read back from the database.
    """
    out: dict[str, Any] = {
        "id": str(user["id"]),
        "aud": user.get("aud") or "",
        "role": user.get("role") or "",
        "email": user.get("email") or "",
    }

    def put_time(key: str, column: str | None = None) -> None:
        value = user.get(column or key)
        if value is not None:
            out[key] = go_time(value)

    put_time("email_confirmed_at")
    put_time("invited_at")
    out["phone"] = user.get("phone") or ""
    put_time("phone_confirmed_at")
    put_time("confirmation_sent_at")
    put_time("confirmed_at")
    put_time("recovery_sent_at")
    if user.get("email_change"):
        out["new_email"] = user["email_change"]
    put_time("email_change_sent_at")
    if user.get("phone_change"):
        out["new_phone"] = user["phone_change"]
    put_time("phone_change_sent_at")
    put_time("reauthentication_sent_at")
    put_time("last_sign_in_at")
    out["app_metadata"] = user.get("raw_app_meta_data")
    out["user_metadata"] = user.get("raw_user_meta_data")
    out["identities"] = None if identities is None else [identity_json(i) for i in identities]
    out["created_at"] = go_time(user["created_at"])
    out["updated_at"] = go_time(user["updated_at"])
    put_time("banned_until")
    put_time("deleted_at")
    out["is_anonymous"] = bool(user.get("is_anonymous"))
    return out


def _loaded_user(record: asyncpg.Record) -> dict[str, Any]:
    """A user row as Auth holds it after loading: NULL or JSON-null metadata reads back as ``{}``."""
    user = dict(record)
    for column in _JSON_COLUMNS:
        if not isinstance(user.get(column), dict):
            user[column] = {}
    return user


def _merge(target: dict[str, Any] | None, updates: Mapping[str, Any]) -> dict[str, Any]:
    """Auth's UpdateUserMetaData / UpdateAppMetaData: a nil map takes the updates as they are."""
    if target is None:
        return dict(updates)
    for key, value in updates.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = value
    return target


def _now() -> datetime:
    return datetime.now(UTC)


def _dumps(value: Any) -> str:
    """JSON as Go's encoding/json writes it: map keys sorted, UTF-8 kept, ``<``, ``>``, ``&`` and the
    line and paragraph separators escaped (it matters where the column is ``json``, not ``jsonb``)."""
    text = json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    for char in "<>&\u2028\u2029":
        text = text.replace(char, f"\\u{ord(char):04x}")
    return text


# --------------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------------


@dataclass
class Exchange:
    """One request as the server saw it: route, fault applied and status sent (0 = connection dropped)."""

    method: str
    path: str
    route: str | None
    fault: str | None = None
    status: int = 0
    dropped: bool = False


_EXCHANGE = web.RequestKey("exchange", Exchange)
_ADMIN_ROLE = web.RequestKey("admin_role", str)
# Auth's ActionLogTypeMap, for the actions the admin user endpoints record.
_AUDIT_LOG_TYPES = {"user_signedup": "team", "user_deleted": "team", "user_modified": "user"}


Handler = Callable[[web.Request], Awaitable[web.Response]]


class AdminApiServer(LocalHttpService):
    """The Auth admin user endpoints on 127.0.0.1, writing into the database at ``database_url``.

    ``service_key`` is accepted as an admin token; ``anon_key`` is known but refused with ``not_admin``
    (a JWT-shaped key is judged by its ``role`` claim instead); any other token is a ``bad_jwt``.
    ``quirk_null_metadata`` reproduces Auth's answer ``"user_metadata": null`` (and a JSON ``null`` in
    the column) for a create with ``password_hash`` but neither ``user_metadata`` nor ``email_confirm``.
    ``audit_log`` writes the ``auth.audit_log_entries`` rows Auth writes in the same transactions.
    ``bcrypt_cost`` is Auth's 10 by default; a lower one only makes password-less creates faster
    (Auth hashes a random password for them). ``ignore_id_and_hash`` behaves like an Auth release older
    than custom ids and password hashes on admin create: both are dropped without a word (a random id,
    a random password).

    Counters: ``requests`` (every request received), ``creates`` (creates committed), ``created_ids``,
    ``statuses`` (by status sent; 0 for dropped connections), ``faults_injected`` (by kind) and
    ``exchanges`` (one :class:`Exchange` per request).
    """

    def __init__(
        self,
        database_url: str,
        service_key: str = "service-role-key",
        anon_key: str = "anon-key",
        faults: Faults | None = None,
        *,
        quirk_null_metadata: bool = True,
        audit_log: bool = True,
        bcrypt_cost: int = 10,
        pool_size: int = 10,
        ignore_id_and_hash: bool = False,
    ) -> None:
        self.database_url = database_url
        self.service_key = service_key
        self.anon_key = anon_key
        self.faults = faults
        self.quirk_null_metadata = quirk_null_metadata
        self.audit_log = audit_log
        self.bcrypt_cost = bcrypt_cost
        self.ignore_id_and_hash = ignore_id_and_hash
        self.pool_size = pool_size
        self.requests = 0
        self.creates = 0
        self.created_ids: list[str] = []
        self.statuses: Counter[int] = Counter()
        self.exchanges: list[Exchange] = []
        self._pool: asyncpg.Pool | None = None
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL a Supabase client takes (``http://127.0.0.1:PORT``)."""
        if self._port is None:
            raise RuntimeError("the server is not running")
        return f"http://127.0.0.1:{self._port}"

    @property
    def faults_injected(self) -> Counter[str]:
        """Faults injected so far, by kind."""
        return self.faults.injected if self.faults is not None else Counter()

    async def start(self) -> None:
        """Open the database pool and start listening on a free 127.0.0.1 port."""
        self._pool = await asyncpg.create_pool(
            self.database_url, min_size=1, max_size=self.pool_size, init=_init_connection, reset=_keep_session
        )
        app = web.Application(middlewares=[self._count], client_max_size=8 * MAX_BODY_BYTES)
        base = f"{PREFIX}/admin/users"
        app.router.add_get(base, self._route(ROUTE_LIST, self._list_users))
        app.router.add_post(base, self._route(ROUTE_CREATE, self._create_user))
        app.router.add_get(base + "/{user_id}", self._route(ROUTE_GET, self._get_user))
        app.router.add_put(base + "/{user_id}", self._route(ROUTE_UPDATE, self._update_user))
        app.router.add_delete(base + "/{user_id}", self._route(ROUTE_DELETE, self._delete_user))
        await self._listen(app)

    # -- plumbing --------------------------------------------------------------------------------

    @web.middleware
    async def _count(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.requests += 1
        exchange = Exchange(request.method, request.path_qs, None)
        self.exchanges.append(exchange)
        request[_EXCHANGE] = exchange
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # unknown path or method
            exchange.status = exc.status
            self.statuses[exc.status] += 1
            raise
        if not exchange.dropped:
            exchange.status = response.status
        self.statuses[exchange.status] += 1
        return response

    def _route(self, name: str, handler: Handler) -> Handler:
        async def run(request: web.Request) -> web.Response:
            exchange = request[_EXCHANGE]
            exchange.route = name
            fault = self.faults.draw(name) if self.faults is not None else None
            exchange.fault = fault
            if fault in _BEFORE_HANDLING:
                return self._fault_response(request, fault)
            if fault == FAULT_SLOW:
                assert self.faults is not None
                # The body is in before the server stalls, so the work goes on after the client left.
                with contextlib.suppress(ConnectionError):
                    await request.read()
                await asyncio.sleep(self.faults.delay_seconds)
            try:
                request[_ADMIN_ROLE] = self._authorise(request)
                response = await handler(request)
            except ApiError as err:
                response = error_response(request, err)
            except Exception as exc:
                # Auth's recoverer turns a panic into a JSON 500; keep the traceback for the test log.
                _log.exception("unhandled error in %s %s", request.method, request.path)
                response = error_response(request, _internal("Internal Server Error", exc))
            if fault == FAULT_COMMIT_THEN_504:
                return error_response(
                    request,
                    ApiError(
                        504,
                        "request_timeout",
                        "Processing this request timed out, please retry after a moment.",
                    ),
                )
            if fault == FAULT_COMMIT_THEN_DROP:
                exchange.dropped = True
                if request.transport is not None:
                    request.transport.abort()
                # Nothing can be sent any more; aiohttp discards this answer on the closed transport.
                return web.Response(status=204)
            return response

        return run

    def _fault_response(self, request: web.Request, fault: str) -> web.Response:
        if fault == FAULT_RATE_LIMIT_JSON:
            return error_response(
                request, ApiError(429, "over_request_rate_limit", "Request rate limit reached")
            )
        if fault in (FAULT_RATE_LIMIT_TEXT, FAULT_RATE_LIMIT_TEXT_BARE):
            headers = {}
            if fault == FAULT_RATE_LIMIT_TEXT:
                assert self.faults is not None
                headers["Retry-After"] = self.faults.retry_after
            return web.Response(status=429, text="Too Many Requests", headers=headers)
        if fault == FAULT_SERVER_ERROR:
            return error_response(
                request,
                _internal("Unexpected failure, please check server logs for more information"),
            )
        if fault == FAULT_BAD_GATEWAY:
            html = "<html><head><title>502 Bad Gateway</title></head><body>502 Bad Gateway</body></html>"
            return web.Response(status=502, text=html, content_type="text/html")
        if fault == FAULT_SERVICE_UNAVAILABLE:
            return web.Response(status=503, text="upstream connect error or disconnect/reset before headers")
        if fault == FAULT_BAD_JWT:
            return error_response(
                request,
                ApiError(
                    403, "bad_jwt", "invalid JWT: unable to parse or verify signature, token is unverifiable"
                ),
            )
        return web.Response(status=504, text="upstream request timeout")

    def _authorise(self, request: web.Request) -> str:
        """Auth's requireAdminCredentials: a Bearer token whose role is an admin role; that role."""
        match = _BEARER_RE.fullmatch(request.headers.get("Authorization", ""))
        if match is None:
            raise ApiError(401, "no_authorization", "This endpoint requires a valid Bearer token")
        token = match.group(1)
        if token == self.service_key:
            role = _jwt_role(token) or "service_role"
        elif token == self.anon_key:
            role = _jwt_role(token) or "anon"
        else:
            reason = (
                "token signature is invalid: signature is invalid"
                if token.count(".") == 2
                else "token is malformed: token contains an invalid number of segments"
            )
            raise ApiError(403, "bad_jwt", f"invalid JWT: unable to parse or verify signature, {reason}")
        if role not in ADMIN_ROLES:
            raise ApiError(403, "not_admin", "User not allowed")
        return role

    @staticmethod
    def _aud(request: web.Request) -> str:
        # The admin token's own aud is ignored; X-JWT-AUD overrides the configured audience.
        return request.headers.get("X-JWT-AUD") or DEFAULT_AUD

    @staticmethod
    async def _body(request: web.Request) -> bytes:
        body = await request.read()
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, "request_entity_too_large", "Request body too large")
        return body

    async def _load_user(self, request: web.Request, conn: asyncpg.Connection) -> dict[str, Any]:
        """Auth's loadUser: 404 validation_failed for a non-UUID, 404 user_not_found when absent."""
        user_id = parse_uuid(request.match_info["user_id"])
        if user_id is None:
            raise ApiError(404, "validation_failed", "user_id must be an UUID")
        try:
            record = await conn.fetchrow(
                "SELECT * FROM auth.users WHERE instance_id = $1 AND id = $2", NIL_UUID, user_id
            )
        except asyncpg.PostgresError as exc:
            raise _internal("Database error loading user", exc) from exc
        if record is None:
            raise ApiError(404, "user_not_found", "User not found")
        return _loaded_user(record)

    @staticmethod
    async def _identities(conn: asyncpg.Connection, user_id: uuid.UUID) -> list[dict[str, Any]]:
        rows = await conn.fetch(
            "SELECT * FROM auth.identities WHERE user_id = $1 ORDER BY created_at, provider", user_id
        )
        return [dict(row) for row in rows]

    async def _audit(
        self, conn: asyncpg.Connection, request: web.Request, action: str, user: Mapping, **traits: str
    ) -> None:
        """Auth's NewAuditLogEntry for an admin call: the actor is the admin user requireAdmin makes from
        the token (nil id, the token's role as its e-mail, hence its name); the traits name the user."""
        if not self.audit_log:
            return
        payload = {
            "actor_id": str(NIL_UUID),
            "actor_via_sso": False,
            "actor_username": request[_ADMIN_ROLE],
            "action": action,
            "log_type": _AUDIT_LOG_TYPES[action],
            "traits": {
                "user_id": str(user["id"]),
                "user_email": user.get("email") or "",
                "user_phone": user.get("phone") or "",
                **traits,
            },
        }
        await conn.execute(
            "INSERT INTO auth.audit_log_entries (instance_id, id, payload, created_at, ip_address) "
            "VALUES ($1, $2, $3::text::json, $4, '')",
            NIL_UUID,
            uuid.uuid4(),
            _dumps(payload),
            _now(),
        )

    # -- duplicate checks ------------------------------------------------------------------------

    async def _email_taken(self, conn: asyncpg.Connection, email: str, aud: str) -> bool:
        """Auth's IsDuplicatedEmail: identities of every non-SSO provider first, then users.email."""
        try:
            rows = await conn.fetch(
                "SELECT DISTINCT user_id FROM auth.identities WHERE email = $1 AND provider NOT LIKE 'sso:%'",
                email.lower(),
            )
            for row in rows:
                owner = await conn.fetchrow(
                    "SELECT aud FROM auth.users WHERE instance_id = $1 AND id = $2", NIL_UUID, row["user_id"]
                )
                if owner is None:
                    # Auth fails the whole check when an identity's user cannot be loaded.
                    raise _internal("Database error checking email")
                if owner["aud"] == aud:
                    return True
            found = await conn.fetchval(
                "SELECT 1 FROM auth.users WHERE instance_id = $1 AND lower(email) = $2 AND aud = $3 "
                "AND is_sso_user = false LIMIT 1",
                NIL_UUID,
                email.lower(),
                aud,
            )
        except asyncpg.PostgresError as exc:
            raise _internal("Database error checking email", exc) from exc
        return found is not None

    async def _phone_taken(self, conn: asyncpg.Connection, phone: str, aud: str) -> bool:
        try:
            found = await conn.fetchval(
                "SELECT 1 FROM auth.users WHERE instance_id = $1 AND phone = $2 AND aud = $3 "
                "AND is_sso_user = false LIMIT 1",
                NIL_UUID,
                phone,
                aud,
            )
        except asyncpg.PostgresError as exc:
            raise _internal("Database error checking phone", exc) from exc
        return found is not None

    # -- POST /admin/users -----------------------------------------------------------------------

    async def _create_user(self, request: web.Request) -> web.Response:
        """Auth's adminUserCreate, check by check."""
        params = decode_params(await self._body(request), _ADMIN_PARAMS, "AdminUserParams")
        if self.ignore_id_and_hash:
            params.pop("id", None)
            params.pop("password_hash", None)
        aud = params.get("aud") or self._aud(request)
        email = params.get("email") or ""
        phone = params.get("phone") or ""
        if not email and not phone:
            raise ApiError(400, "validation_failed", "Cannot create a user without either an email or phone")

        providers: list[str] = []
        async with self.pool.acquire() as conn:
            if email:
                email = validate_email(email)
                if await self._email_taken(conn, email, aud):
                    raise ApiError(422, "email_exists", DUPLICATE_EMAIL_MSG)
                providers.append("email")
            if phone:
                phone = validate_phone(phone)
                if await self._phone_taken(conn, phone, aud):
                    raise ApiError(422, "phone_exists", DUPLICATE_PHONE_MSG)
                providers.append("phone")

        password: str | None = params.get("password")
        password_hash: str = params.get("password_hash") or ""
        if password is not None and password_hash:
            raise ApiError(400, "validation_failed", "Only a password or a password hash should be provided")
        user_metadata: dict[str, Any] | None = params.get("user_metadata")
        if password_hash:
            if not password_hash_accepted(password_hash):
                raise _internal("Error creating user")
            encrypted = password_hash
            # NewUserWithPasswordHash keeps a missing user_metadata as a nil map: the quirk.
            if not self.quirk_null_metadata and user_metadata is None:
                user_metadata = {}
        else:
            plain = password or _random_password()
            try:
                encrypted = await asyncio.to_thread(_hash_password, plain, self.bcrypt_cost)
            except ValueError as exc:  # over 72 bytes
                raise ApiError(400, "validation_failed", "bcrypt: password length exceeds 72 bytes") from exc
            if user_metadata is None:
                user_metadata = {}

        user_id = uuid.uuid4()
        if params.get("id"):
            custom = parse_uuid(params["id"])
            if custom is None:
                raise ApiError(400, "validation_failed", "ID must conform to the uuid v4 format")
            if custom == NIL_UUID:
                raise ApiError(400, "validation_failed", "ID cannot be a nil uuid")
            user_id = custom

        ban = _ban_duration(params)

        now = _now()
        user: dict[str, Any] = {
            "instance_id": NIL_UUID,
            "id": user_id,
            "aud": aud,
            "role": "",  # set by a separate UPDATE, as Auth does after the insert
            "email": email or None,
            "encrypted_password": encrypted,
            "email_confirmed_at": None,
            "invited_at": None,
            "confirmation_token": "",
            "confirmation_sent_at": None,
            "recovery_token": "",
            "recovery_sent_at": None,
            "email_change_token_new": "",
            "email_change": "",
            "email_change_sent_at": None,
            "last_sign_in_at": None,
            "raw_app_meta_data": {"provider": providers[0], "providers": providers},
            "raw_user_meta_data": user_metadata,
            "created_at": now,
            "updated_at": now,
            "phone": phone or None,
            "phone_confirmed_at": None,
            "phone_change": "",
            "phone_change_token": "",
            "phone_change_sent_at": None,
            "email_change_token_current": "",
            "email_change_confirm_status": 0,
            "banned_until": None,
            "reauthentication_token": "",
            "reauthentication_sent_at": None,
            "is_sso_user": False,
            "deleted_at": None,
            "is_anonymous": False,
        }
        identities: list[dict[str, Any]] = []
        for provider, value in (("email", email), ("phone", phone)):
            if value:
                stamp = _now()
                identities.append(
                    {
                        "id": uuid.uuid4(),
                        "provider_id": str(user_id),
                        "user_id": user_id,
                        "identity_data": {
                            "sub": str(user_id),
                            provider: value,
                            "email_verified": False,
                            "phone_verified": False,
                        },
                        "provider": provider,
                        "last_sign_in_at": stamp,
                        "created_at": stamp,
                        "updated_at": stamp,
                        "email": value if provider == "email" else None,
                    }
                )

        try:
            async with self.pool.acquire() as conn, conn.transaction():
                await _insert_user(conn, user)
                for identity in identities:
                    await _insert_identity(conn, identity)
                # The provider trait follows app_metadata's "provider" (the first of e-mail, phone).
                await self._audit(conn, request, "user_signedup", user, provider=providers[0])
                user["role"] = DEFAULT_ROLE if not params.get("role") else params["role"].strip()
                await _update_columns(conn, user, "role")
                if params.get("app_metadata") is not None:
                    _merge(user["raw_app_meta_data"], params["app_metadata"])
                    await _update_columns(conn, user, "raw_app_meta_data")
                if params.get("email_confirm"):
                    await _confirm_email(conn, user)
                if params.get("phone_confirm"):
                    await _confirm_phone(conn, user)
                if ban is not None:
                    user["banned_until"] = None if ban == timedelta(0) else _now() + ban
                    await _update_columns(conn, user, "banned_until")
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            raise _internal("Database error creating new user", exc) from exc

        self.creates += 1
        self.created_ids.append(str(user_id))
        # The answer is the in-memory user: no confirmed_at (generated by the database), identities on.
        return web.json_response(user_json(user, identities))

    # -- GET /admin/users/{id} -------------------------------------------------------------------

    async def _get_user(self, request: web.Request) -> web.Response:
        """Auth's adminUserGet: the stored user with its identities."""
        async with self.pool.acquire() as conn:
            user = await self._load_user(request, conn)
            identities = await self._identities(conn, user["id"])
        return web.json_response(user_json(user, identities))

    # -- GET /admin/users ------------------------------------------------------------------------

    async def _list_users(self, request: web.Request) -> web.Response:
        """Auth's adminUsers: offset pagination, newest first, Link and X-Total-Count headers."""
        query = request.rel_url.query
        page, per_page = 1, 50
        try:
            if query.get("page"):
                page = _parse_uint(query["page"])
            if query.get("per_page"):
                per_page = _parse_uint(query["per_page"])
        except ValueError as exc:
            raise ApiError(400, "validation_failed", f"Bad Pagination Parameters: {exc}") from exc
        order = _parse_sort(query.get("sort", ""))
        if per_page == 0:
            # Auth divides by per_page while building the pagination headers.
            raise _internal("Unexpected failure, please check server logs for more information")
        aud = self._aud(request)
        where = "instance_id = $1 AND aud = $2"
        args: list[Any] = [NIL_UUID, aud]
        filter_text = query.get("filter", "")
        if filter_text:
            # % and _ in the filter stay live wildcards, as in Auth.
            args.append(f"%{filter_text}%")
            where += " AND (email LIKE $3 OR raw_user_meta_data->>'full_name' ILIKE $3)"
        # pop's paginator turns page 0 into 1; values past int64 are clamped rather than overflowing.
        limit = min(per_page, 2**62)
        offset = min((max(page, 1) - 1) * limit, 2**62)
        async with self.pool.acquire() as conn:
            try:
                total = await conn.fetchval(f"SELECT count(*) FROM auth.users WHERE {where}", *args)
                rows = await conn.fetch(
                    f"SELECT * FROM auth.users WHERE {where} ORDER BY {order} LIMIT {limit} OFFSET {offset}",
                    *args,
                )
            except asyncpg.PostgresError as exc:
                raise _internal("Database error finding users", exc) from exc
        users = [user_json(_loaded_user(row), None) for row in rows]
        headers = {
            "Link": _link_header(request, page, per_page, total),
            "X-Total-Count": str(total),
        }
        return web.json_response({"users": users, "aud": aud}, headers=headers)

    # -- PUT /admin/users/{id} -------------------------------------------------------------------

    async def _update_user(self, request: web.Request) -> web.Response:
        """Auth's adminUserUpdate: immediate changes, merged metadata, no duplicate check."""
        async with self.pool.acquire() as conn:
            user = await self._load_user(request, conn)
            identities = await self._identities(conn, user["id"])
        params = decode_params(await self._body(request), _ADMIN_PARAMS, "AdminUserParams")
        email = validate_email(params["email"]) if params.get("email") else ""
        phone = validate_phone(params["phone"]) if params.get("phone") else ""
        ban = _ban_duration(params)
        new_hash: str | None = None
        if params.get("password") is not None:
            password = params["password"]
            if len(password) < PASSWORD_MIN_LENGTH:
                message = f"Password should be at least {PASSWORD_MIN_LENGTH} characters."
                raise ApiError(
                    422, "weak_password", message, extra={"weak_password": {"reasons": ["length"]}}
                )
            try:
                new_hash = await asyncio.to_thread(_hash_password, password, self.bcrypt_cost)
            except ValueError as exc:
                raise _internal("Unexpected failure, please check server logs for more information") from exc

        created: list[dict[str, Any]] = []
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                if params.get("role"):
                    user["role"] = params["role"].strip()
                    await _update_columns(conn, user, "role")
                if params.get("email_confirm"):
                    await _confirm_email(conn, user)
                if params.get("phone_confirm"):
                    await _confirm_phone(conn, user)
                if new_hash is not None:
                    await _set_password(conn, user, new_hash)
                for provider, value, verified in (
                    ("email", email, bool(params.get("email_confirm"))),
                    ("phone", phone, bool(params.get("phone_confirm"))),
                ):
                    if not value:
                        continue
                    identity = await _upsert_identity(conn, user, provider, value, verified)
                    if identity is not None:
                        created.append(identity)
                    user[provider] = value
                    await _update_columns(conn, user, provider)
                if params.get("app_metadata") is not None:
                    user["raw_app_meta_data"] = _merge(user["raw_app_meta_data"], params["app_metadata"])
                    await _update_columns(conn, user, "raw_app_meta_data")
                if params.get("user_metadata") is not None:
                    user["raw_user_meta_data"] = _merge(user["raw_user_meta_data"], params["user_metadata"])
                    await _update_columns(conn, user, "raw_user_meta_data")
                if ban is not None:
                    user["banned_until"] = None if ban == timedelta(0) else _now() + ban
                    await _update_columns(conn, user, "banned_until")
                await self._audit(conn, request, "user_modified", user)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            raise _internal("Error updating user", exc) from exc
        # Auth answers with the user it loaded, updated in memory; identities it updated in place
        # still show their old data, new ones are appended.
        return web.json_response(user_json(user, identities + created))

    # -- DELETE /admin/users/{id} ----------------------------------------------------------------

    async def _delete_user(self, request: web.Request) -> web.Response:
        """Auth's adminUserDelete: hard delete (identities cascade) or soft delete."""
        async with self.pool.acquire() as conn:
            user = await self._load_user(request, conn)
        body = await self._body(request)
        params = decode_params(body, _DELETE_PARAMS, "adminUserDeleteParams") if body else {}
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                await self._audit(conn, request, "user_deleted", user)
                if params.get("should_soft_delete"):
                    if user["deleted_at"] is None:
                        await _soft_delete(conn, user)
                else:
                    await conn.execute("DELETE FROM auth.users WHERE id = $1", user["id"])
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            soft = params.get("should_soft_delete")
            message = "Error soft deleting user" if soft else "Database error deleting user"
            raise _internal(message, exc) from exc
        return web.json_response({})


# --------------------------------------------------------------------------------------------------
# SQL helpers
# --------------------------------------------------------------------------------------------------


async def _init_connection(conn: asyncpg.Connection) -> None:
    # Decode jsonb to Python values; writes pass JSON text (so a Go nil map can be written as null).
    await conn.set_type_codec("jsonb", encoder=str, decoder=json.loads, schema="pg_catalog", format="text")
    await conn.set_type_codec("json", encoder=str, decoder=json.loads, schema="pg_catalog", format="text")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """A released connection goes back to the pool as it is, as in Auth's own pool: the handlers set no
    session state (no SET, LISTEN or advisory lock), so asyncpg's RESET ALL round trip per request is
    skipped (an unfinished transaction is still rolled back)."""


def _param(column: str, index: int) -> str:
    return f"${index}::text::jsonb" if column in _JSON_COLUMNS else f"${index}"


def _value(column: str, value: Any) -> Any:
    return _dumps(value) if column in _JSON_COLUMNS else value


async def _insert_user(conn: asyncpg.Connection, user: Mapping[str, Any]) -> None:
    columns = ", ".join(_USER_INSERT_COLUMNS)
    params = ", ".join(_param(c, i) for i, c in enumerate(_USER_INSERT_COLUMNS, start=1))
    await conn.execute(
        f"INSERT INTO auth.users ({columns}) VALUES ({params})",
        *(_value(c, user[c]) for c in _USER_INSERT_COLUMNS),
    )


async def _insert_identity(conn: asyncpg.Connection, identity: Mapping[str, Any]) -> None:
    # identities.email is generated from identity_data and must not be named.
    await conn.execute(
        "INSERT INTO auth.identities (provider_id, user_id, identity_data, provider, last_sign_in_at, "
        "created_at, updated_at, id) VALUES ($1, $2, $3::text::jsonb, $4, $5, $6, $7, $8)",
        identity["provider_id"],
        identity["user_id"],
        _dumps(identity["identity_data"]),
        identity["provider"],
        identity["last_sign_in_at"],
        identity["created_at"],
        identity["updated_at"],
        identity["id"],
    )


async def _update_columns(conn: asyncpg.Connection, user: dict[str, Any], *columns: str) -> None:
    """pop's UpdateOnly: write the named columns (and updated_at) of ``user``."""
    user["updated_at"] = _now()
    names = [*columns, "updated_at"]
    sets = ", ".join(f"{c} = {_param(c, i)}" for i, c in enumerate(names, start=2))
    await conn.execute(
        f"UPDATE auth.users SET {sets} WHERE id = $1", user["id"], *(_value(c, user[c]) for c in names)
    )


async def _confirm_email(conn: asyncpg.Connection, user: dict[str, Any]) -> None:
    """Auth's User.Confirm: stamp email_confirmed_at, then add email_verified to the user metadata."""
    user["confirmation_token"] = ""
    user["email_confirmed_at"] = _now()
    await _update_columns(conn, user, "confirmation_token", "email_confirmed_at")
    user["raw_user_meta_data"] = _merge(user["raw_user_meta_data"], {"email_verified": True})
    await _update_columns(conn, user, "raw_user_meta_data")
    await conn.execute("DELETE FROM auth.one_time_tokens WHERE user_id = $1", user["id"])


async def _confirm_phone(conn: asyncpg.Connection, user: dict[str, Any]) -> None:
    """Auth's User.ConfirmPhone: stamp phone_confirmed_at."""
    user["confirmation_token"] = ""
    user["phone_confirmed_at"] = _now()
    await _update_columns(conn, user, "confirmation_token", "phone_confirmed_at")
    await conn.execute("DELETE FROM auth.one_time_tokens WHERE user_id = $1", user["id"])


async def _set_password(conn: asyncpg.Connection, user: dict[str, Any], new_hash: str) -> None:
    """Auth's UpdatePassword: new hash, pending tokens cleared, every session signed out."""
    user["encrypted_password"] = new_hash
    for column in (
        "confirmation_token",
        "recovery_token",
        "email_change_token_current",
        "email_change_token_new",
        "phone_change_token",
        "reauthentication_token",
    ):
        user[column] = ""
    for column in (
        "confirmation_sent_at",
        "recovery_sent_at",
        "email_change_sent_at",
        "phone_change_sent_at",
        "reauthentication_sent_at",
    ):
        user[column] = None
    await _update_columns(
        conn,
        user,
        "encrypted_password",
        "confirmation_token",
        "confirmation_sent_at",
        "recovery_token",
        "recovery_sent_at",
        "email_change_token_current",
        "email_change_token_new",
        "email_change_sent_at",
        "phone_change_token",
        "phone_change_sent_at",
        "reauthentication_token",
        "reauthentication_sent_at",
    )
    await conn.execute("DELETE FROM auth.one_time_tokens WHERE user_id = $1", user["id"])
    await conn.execute("DELETE FROM auth.sessions WHERE user_id = $1", user["id"])


async def _upsert_identity(
    conn: asyncpg.Connection, user: Mapping[str, Any], provider: str, value: str, verified: bool
) -> dict[str, Any] | None:
    """The identity part of an admin update: create the provider's identity, or update its data.

    Returns the new identity, or None when an existing one was updated.
    """
    existing = await conn.fetchrow(
        "SELECT id, identity_data FROM auth.identities WHERE provider_id = $1 AND provider = $2",
        str(user["id"]),
        provider,
    )
    if existing is None:
        stamp = _now()
        identity = {
            "id": uuid.uuid4(),
            "provider_id": str(user["id"]),
            "user_id": user["id"],
            "identity_data": {
                "sub": str(user["id"]),
                provider: value,
                "email_verified": verified if provider == "email" else False,
                "phone_verified": verified if provider == "phone" else False,
            },
            "provider": provider,
            "last_sign_in_at": stamp,
            "created_at": stamp,
            "updated_at": stamp,
            "email": value if provider == "email" else None,
        }
        await _insert_identity(conn, identity)
        return identity
    data = existing["identity_data"] if isinstance(existing["identity_data"], dict) else None
    data = _merge(data, {provider: value, f"{provider}_verified": verified})
    await conn.execute(
        "UPDATE auth.identities SET identity_data = $2::text::jsonb WHERE id = $1",
        existing["id"],
        _dumps(data),
    )
    return None


async def _soft_delete(conn: asyncpg.Connection, user: dict[str, Any]) -> None:
    """Auth's SoftDeleteUser and SoftDeleteUserIdentities, then factors and sessions dropped."""
    user_id = user["id"]
    changes = soft_deleted_columns(user)
    user.update(changes)
    user["deleted_at"] = _now()
    await _update_columns(conn, user, *changes, "deleted_at")
    await conn.execute("DELETE FROM auth.one_time_tokens WHERE user_id = $1", user_id)
    user["raw_user_meta_data"] = {}
    user["raw_app_meta_data"] = {}
    await _update_columns(conn, user, "raw_user_meta_data")
    await _update_columns(conn, user, "raw_app_meta_data")
    await conn.execute("DELETE FROM auth.sessions WHERE user_id = $1", user_id)
    for row in await conn.fetch(
        "SELECT id, provider, provider_id FROM auth.identities WHERE user_id = $1", user_id
    ):
        await conn.execute(
            "UPDATE auth.identities SET identity_data = '{}'::jsonb, provider_id = $2 WHERE id = $1",
            row["id"],
            obfuscated(user_id, f"{row['provider']}:{row['provider_id']}"),
        )
    await conn.execute("DELETE FROM auth.mfa_factors WHERE user_id = $1", user_id)
    await conn.execute("DELETE FROM auth.refresh_tokens WHERE user_id = $1", str(user_id))


def _ban_duration(params: Mapping[str, Any]) -> timedelta | None:
    """The ``ban_duration`` param: None when absent, zero for ``"none"`` (unban), else a Go duration."""
    text = params.get("ban_duration") or ""
    if not text:
        return None
    if text == "none":
        return timedelta(0)
    try:
        return parse_go_duration(text)
    except ValueError as exc:
        raise ApiError(400, "validation_failed", f"invalid format for ban duration: {exc}") from exc


def _parse_uint(text: str) -> int:
    """Go's strconv.ParseUint(text, 10, 64)."""
    if not text.isascii() or not text.isdigit():
        raise ValueError(f'strconv.ParseUint: parsing "{text}": invalid syntax')
    value = int(text)
    if value >= 2**64:
        raise ValueError(f'strconv.ParseUint: parsing "{text}": value out of range')
    return value


def _parse_sort(text: str) -> str:
    """Auth's sort parameter: ``created_at`` only, default direction descending."""
    if not text:
        return "created_at DESC"
    fields = []
    for part in text.split(","):
        pieces = part.strip().split(" ")
        name = pieces[0]
        if name != "created_at":
            raise ApiError(400, "validation_failed", f"Bad Sort Parameters: bad field for sort '{name}'")
        direction = "DESC"
        if len(pieces) == 2:
            direction = pieces[1].upper()
            if direction not in ("ASC", "DESC"):
                raise ApiError(
                    400,
                    "validation_failed",
                    f"Bad Sort Parameters: bad direction for sort '{pieces[1]}', "
                    "only 'asc' and 'desc' allowed",
                )
        fields.append(f"created_at {direction}")
    return ", ".join(fields)


def _link_header(request: web.Request, page: int, per_page: int, total: int) -> str:
    """Auth's addPaginationHeaders: ``next`` when more pages exist, ``last`` always.

    The URLs are the request's own, relative and without the gateway prefix, with ``page`` replaced
    and the query re-encoded with sorted keys (Go's ``url.Values.Encode``).
    """
    total_pages = math.ceil(total / per_page)
    path = request.path.removeprefix(PREFIX) or "/"
    query = {key: request.rel_url.query.getall(key) for key in request.rel_url.query}

    def url_for(target: int) -> str:
        values = dict(query)
        values["page"] = [str(target)]
        pairs = [(key, value) for key in sorted(values) for value in values[key]]
        return f"{path}?{urlencode(pairs)}"

    parts = []
    if total_pages > page:
        parts.append(f'<{url_for(page + 1)}>; rel="next"')
    parts.append(f'<{url_for(total_pages)}>; rel="last"')
    return ", ".join(parts)


def _jwt_role(token: str) -> str | None:
    """The ``role`` claim of a JWT-shaped token (signature not checked), else None."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return None
    role = payload.get("role") if isinstance(payload, dict) else None
    return role if isinstance(role, str) else None


async def serve(database_url: str) -> None:
    """Run the server until cancelled, printing its URL (for trying it by hand)."""
    async with AdminApiServer(database_url) as server:
        print(server.url, flush=True)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python tests/admin_api_server.py DATABASE_URL")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(sys.argv[1]))
