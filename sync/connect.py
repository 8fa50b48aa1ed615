"""Connections to the source and the target, as users paste them from the Supabase dashboard.

Any libpq form works (``postgresql://`` URLs, ``key=value`` strings, ``PG*`` variables): the DSN is
parsed by libpq's rules (:mod:`sync.conninfo`) and handed to asyncpg as keywords. Supabase's pooler in
transaction mode (port 6543) gets no prepared-statement cache and no session state; the source is
only ever read. Passwords never appear in messages.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
from collections.abc import Awaitable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, TypeVar
from urllib.parse import urlencode

import asyncpg

from sync.conninfo import ConninfoError, parse_conninfo
from sync.errors import ConnectError, first_line
from sync.retry import CONNECT_ATTEMPTS, CONNECT_MAX_WAIT, is_transient_connect_error, retrying

T = TypeVar("T")
U = TypeVar("U")

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
            params = parse_conninfo(dsn or "")
        except ConninfoError as exc:
            # libpq quotes the offending token, which may be a piece of the password: never shown.
            reason = _QUOTED.sub('"…"', redact(first_line(exc), dsn))
            raise ConnectError(
                f"The {side} DSN is not a valid connection string ({reason}){_ENCODE}"
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
        _check_params(side, params)
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


_QUOTED = re.compile(r'"[^"]*"')
_ENCODE = (
    ": if the password holds @ # : / ? or %, percent-encode them (@ %40, # %23, : %3A, / %2F, ? %3F, % %25)."
)
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
# libpq parameters asyncpg reads from a DSN's query string, handed over as they are.
_PASSED_ON = (
    "sslmode",
    "sslcert",
    "sslkey",
    "sslrootcert",
    "sslcrl",
    "sslpassword",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "target_session_attrs",
    "krbsrvname",
    "gsslib",
    "passfile",
)


def _check_params(side: Side, params: dict[str, Any]) -> None:
    """Refuse, in one line without any of its values, a DSN libpq parsed into something unusable."""
    ports = str(params.get("port") or "")
    if ports and not all(p.strip().isdigit() for p in ports.split(",")):
        raise ConnectError(f"The {side} DSN's port is not a number{_ENCODE}")
    if "@" in str(params.get("host") or "") or "@" in str(params.get("dbname") or ""):
        raise ConnectError(f"The {side} DSN has an @ after its user and password{_ENCODE}")
    if params.get("sslmode") and params["sslmode"] not in SSL_MODES:
        raise ConnectError(f"The {side} DSN's sslmode must be one of {', '.join(SSL_MODES)}.")
    if params.get("options") is not None:
        server_settings(str(params["options"]), side)


def server_settings(options: str, side: Side) -> dict[str, str]:
    """libpq's ``options`` (``-c name=value`` or ``--name=value``, space-separated) as settings."""
    words = options.replace("\\ ", "\0").split()
    settings: dict[str, str] = {}
    index = 0
    while index < len(words):
        word = words[index]
        if word == "-c" and index + 1 < len(words):
            index += 1
            word = words[index]
        elif word.startswith("-c") or word.startswith("--"):
            word = word[2:]
        else:
            raise ConnectError(f"The {side} DSN's options must be -c name=value settings.")
        name, sep, value = word.partition("=")
        if not sep or not name:
            raise ConnectError(f"The {side} DSN's options must be -c name=value settings.")
        settings[name.replace("-", "_")] = value.replace("\0", " ")
        index += 1
    return settings


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
        return parse_conninfo(dsn).get("password") or None
    except ConninfoError:
        return None


async def connect(endpoint: Endpoint, *, application_name: str = "sync") -> asyncpg.Connection:
    """Open one asyncpg connection to ``endpoint``; failures become one ConnectError line naming the side."""
    p = endpoint.params
    kwargs = connect_arguments(endpoint)
    kwargs["server_settings"]["application_name"] = application_name
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
        # A session's statements run once each, on estimates a stage's fresh rows can put far too high:
        # JIT compilation (wherever the server was built with it, as Debian's PostgreSQL 15 is) then costs
        # more than it saves (1.35 s of the settling statement's 3.25 s at scale 100). Turned off with the
        # timeout, in the same round trip, not as a startup parameter: poolers refuse those.
        await conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}; SET jit = off")
    return conn


async def both(first: Awaitable[T], second: Awaitable[U]) -> tuple[T, U]:
    """``first`` and ``second`` at once (the source's and the target's side of one step); when either
    fails, the other is still awaited, and the first's failure is the one raised."""
    results = await asyncio.gather(first, second, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results[0], results[1]  # type: ignore[return-value]


async def connect_both(
    source: Endpoint, target: Endpoint, *, application_name: str = "sync"
) -> tuple[asyncpg.Connection, asyncpg.Connection]:
    """One connection to each side, opened at once; neither is left open when the other fails."""
    sconn, tconn = await open_all(
        connect(source, application_name=application_name),
        connect(target, application_name=application_name),
    )
    return sconn, tconn


async def open_all(*opening: Awaitable[asyncpg.Connection]) -> list[asyncpg.Connection]:
    """The connections ``opening`` opens, all at once; when one fails, those that opened are closed and
    the first failure is raised."""
    opened = await asyncio.gather(*opening, return_exceptions=True)
    failed = [result for result in opened if isinstance(result, BaseException)]
    if failed:
        for result in opened:
            if isinstance(result, asyncpg.Connection):
                await result.close()
        raise failed[0]
    return opened  # type: ignore[return-value]


async def call_off(*tasks: asyncio.Future[Any] | None) -> list[Any]:
    """Cancel these (None skipped) and wait for each to end; what each ended with (a result, or the
    exception it ended on)."""
    running = [task for task in tasks if task is not None]
    for task in running:
        task.cancel()
    return await asyncio.gather(*running, return_exceptions=True)


async def discard(*opening: asyncio.Future[Any] | None) -> None:
    """Call off connections still opening (each future one connection or a tuple of them) and close
    those that opened already."""
    for result in await call_off(*opening):
        for conn in result if isinstance(result, tuple) else (result,):
            if isinstance(conn, asyncpg.Connection) and not conn.is_closed():
                await conn.close()


async def _connect_retrying(endpoint: Endpoint, kwargs: dict[str, Any]) -> asyncpg.Connection:
    """``asyncpg.connect``, tried again while the server restarts or fails over (also at start)."""
    connecting = retrying(
        is_transient_connect_error,
        attempts=CONNECT_ATTEMPTS,
        max_wait=CONNECT_MAX_WAIT,
        what=f"connecting to the {endpoint.side} ({endpoint})",
    )
    return await connecting(asyncpg.connect, **kwargs)


async def detect_pool_mode(endpoint: Endpoint) -> Endpoint:
    """``endpoint`` with the pool mode its connections show, whatever port or host it uses.

    Two connections, opened at once, ask for their backend's pid one after the other: behind a
    transaction pooler the second lands on the backend the first just gave back, which no
    session-holding connection can. Both probes run without prepared statements or startup settings,
    which any pooler accepts.
    """
    probe = replace(endpoint, mode=PoolMode.TRANSACTION)
    first, second = await connect_both(probe, probe, application_name="sync probe")
    try:
        pids = [await conn.fetchval("SELECT pg_backend_pid()") for conn in (first, second)]
    finally:
        await both(first.close(), second.close())
    if pids[0] == pids[1]:
        return replace(endpoint, mode=PoolMode.TRANSACTION)
    return endpoint


def connect_arguments(endpoint: Endpoint) -> dict[str, Any]:
    """asyncpg's arguments for ``endpoint``: every libpq parameter it understands, none lost.

    Host, port, user, password and database go as keywords (hosts and ports may be lists, as in
    libpq); the TLS and session-targeting parameters go in a DSN's query string, which asyncpg reads
    by libpq's names; ``options`` becomes server settings; ``connect_timeout`` the timeout.
    """
    p = endpoint.params
    hosts = [h for h in (p.get("host") or "").split(",") if h] or None
    ports = [int(x) for x in (p.get("port") or "").split(",") if x.strip()] or None
    passed = {k: p[k] for k in _PASSED_ON if p.get(k)}
    timeout = p.get("connect_timeout")
    return {
        "dsn": "postgresql://?" + urlencode(passed) if passed else None,
        "host": hosts[0] if hosts and len(hosts) == 1 else hosts,
        "port": ports[0] if ports and len(ports) == 1 else ports,
        "user": p.get("user") or None,
        "password": p.get("password") or None,
        "database": p.get("dbname") or None,
        "timeout": float(timeout)
        if timeout and timeout.isdigit() and int(timeout) > 0
        else CONNECT_TIMEOUT_S,
        "server_settings": server_settings(p["options"], endpoint.side) if p.get("options") else {},
    }


def _oserror_text(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT_S} s"
    text = str(exc).strip()
    if "Multiple exceptions" in text:  # asyncpg tries each address; the first reason is the useful one
        text = text.split(":", 1)[-1].strip().split(", [")[0]
    return text or type(exc).__name__
