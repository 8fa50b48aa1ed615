"""Connections to the source and the target, as users paste them from the Supabase dashboard.

Any libpq form works (``postgresql://`` URLs, ``key=value`` strings, ``PG*`` variables): the DSN is
parsed by libpq's rules (through psycopg) and handed to asyncpg as keywords. Supabase's pooler in
transaction mode (port 6543) gets no prepared-statement cache and no session state; the source is
only ever read. Passwords never appear in messages.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import asyncpg
import psycopg

from sync.errors import ConnectError
from sync.retry import CONNECT_ATTEMPTS, CONNECT_MAX_WAIT, is_transient_connect_error, retrying

# Hosted projects cancel statements after two minutes; batches stay well under it, but catalog and
# count queries on big tables should not die of it either.
STATEMENT_TIMEOUT_MS = 10 * 60 * 1000
CONNECT_TIMEOUT_S = 15


class Side(StrEnum):
    SOURCE = "source"
    TARGET = "target"


class PoolMode(StrEnum):
    """How the connection reaches Postgres; transaction mode forbids session state."""

    DIRECT = "direct"
    SESSION = "session"
    TRANSACTION = "transaction"


@dataclass(frozen=True)
class Endpoint:
    """One side's connection parameters, parsed; ``str()`` never shows the password."""

    side: Side
    params: dict[str, str]
    mode: PoolMode

    @classmethod
    def parse(cls, side: Side, dsn: str | None, mode: PoolMode | None = None) -> Endpoint:
        """Parse a DSN (URL or key=value; empty means the ``PG*`` variables) for ``side``."""
        try:
            params = psycopg.conninfo.conninfo_to_dict(dsn or "")
        except psycopg.ProgrammingError as exc:
            raise ConnectError(
                f"The {side} DSN is not a valid connection string: {redact(str(exc), dsn)}"
            ) from None
        for key, env in (
            ("host", "PGHOST"),
            ("port", "PGPORT"),
            ("user", "PGUSER"),
            ("password", "PGPASSWORD"),
            ("dbname", "PGDATABASE"),
            ("sslmode", "PGSSLMODE"),
        ):
            if key not in params and os.environ.get(env):
                params[key] = os.environ[env]
        if not params.get("host") and not dsn:
            raise ConnectError(f"No {side} database given: pass --{side} DSN or set SYNC_{side.upper()}_URL.")
        return cls(side=side, params={k: str(v) for k, v in params.items()}, mode=mode or classify(params))

    def __str__(self) -> str:
        p = self.params
        return (
            f"{p.get('user', '')}@{p.get('host', 'localhost')}:{p.get('port', '5432')}/{p.get('dbname', '')}"
        )

    @property
    def password(self) -> str | None:
        return self.params.get("password")

    def redact(self, text: str) -> str:
        """``text`` with this endpoint's password replaced by ``***``."""
        return redact(text, self.password)


def classify(params: dict[str, Any]) -> PoolMode:
    """Tell direct, session-pooler and transaction-pooler connections apart from host and port."""
    host = str(params.get("host", ""))
    port = str(params.get("port", "5432"))
    if port == "6543":
        return PoolMode.TRANSACTION  # Supavisor's transaction port, and the dedicated PgBouncer's
    if host.endswith(".pooler.supabase.com"):
        return PoolMode.SESSION
    return PoolMode.DIRECT


# The password of any URL's user-info (scheme://user:password@host), wherever it appears in a text.
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@]*:)[^\s/@]*(@)")


def redact(text: str, *secrets: str | None) -> str:
    """``text`` with each of ``secrets`` and every URL's password replaced by ``***``, for printing.

    ``secrets`` are parsed passwords (``Endpoint.password``, ``password_of``), or a whole DSN that did not
    parse; ``None`` and empty ones are skipped.
    """
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return _URL_PASSWORD.sub(r"\1***\2", text)


def password_of(dsn: str) -> str | None:
    """The password a DSN carries, parsed by libpq's rules (None when it has none or does not parse)."""
    try:
        return psycopg.conninfo.conninfo_to_dict(dsn).get("password") or None  # type: ignore[return-value]
    except psycopg.ProgrammingError:
        return None


async def connect(endpoint: Endpoint, *, application_name: str = "sync") -> asyncpg.Connection:
    """Open one asyncpg connection to ``endpoint``; failures become one ConnectError line naming the side."""
    p = endpoint.params
    kwargs: dict[str, Any] = {
        "host": p.get("host") or None,
        "port": int(p["port"]) if p.get("port") else None,
        "user": p.get("user") or None,
        "password": p.get("password") or None,
        "database": p.get("dbname") or None,
        "timeout": CONNECT_TIMEOUT_S,
        "server_settings": {"application_name": application_name},
    }
    if p.get("sslmode"):
        kwargs["ssl"] = p["sslmode"]
    if endpoint.mode is PoolMode.TRANSACTION:
        # No prepared statements survive a transaction pooler; startup GUCs are unreliable there too.
        kwargs["statement_cache_size"] = 0
        kwargs["server_settings"] = {}
    try:
        conn = await _connect_retrying(endpoint, kwargs)
    except asyncpg.InvalidPasswordError:
        raise ConnectError(
            f"The {endpoint.side} database refused the login for user "
            f"{p.get('user', '')!r}: check the user and password."
        ) from None
    except asyncpg.InvalidCatalogNameError:
        raise ConnectError(
            f"The {endpoint.side} database {p.get('dbname', '')!r} does not exist "
            f"on {p.get('host', 'localhost')}."
        ) from None
    except asyncpg.InvalidAuthorizationSpecificationError as exc:
        raise ConnectError(
            f"The {endpoint.side} database refused the connection: {endpoint.redact(str(exc))}"
        ) from None
    except (TimeoutError, OSError, socket.gaierror) as exc:
        raise ConnectError(
            f"Cannot reach the {endpoint.side} database at {endpoint}: {endpoint.redact(_oserror_text(exc))}"
        ) from None
    except asyncpg.PostgresError as exc:
        raise ConnectError(
            f"The {endpoint.side} database refused the connection: {endpoint.redact(str(exc))}"
        ) from None
    if endpoint.mode is not PoolMode.TRANSACTION:
        await conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
    return conn


async def _connect_retrying(endpoint: Endpoint, kwargs: dict[str, Any]) -> asyncpg.Connection:
    """``asyncpg.connect``, tried again while the server restarts or fails over (also at start)."""
    connecting = retrying(
        is_transient_connect_error,
        attempts=CONNECT_ATTEMPTS,
        max_wait=CONNECT_MAX_WAIT,
        what=f"connecting to the {endpoint.side} ({endpoint})",
    )
    return await connecting(asyncpg.connect, **kwargs)


def _oserror_text(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT_S} s"
    text = str(exc).strip()
    if "Multiple exceptions" in text:  # asyncpg tries each address; the first reason is the useful one
        text = text.split(":", 1)[-1].strip().split(", [")[0]
    return text or type(exc).__name__
