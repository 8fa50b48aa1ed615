"""The retry policy shared by the stages: which failures are transient, and how long to wait for them.

A transient failure is one the same work can succeed after: a lost connection, a serialization
failure or deadlock, a server out of connections or restarting, a statement cancelled by a timeout,
an HTTP 429 or 5xx. Everything else is a data error or a bug and must not be retried blindly: the
caller isolates it (the batch is split until the bad rows are found) or reports it.

Waits grow exponentially with full jitter, so parallel workers that failed together do not come
back together; a server's own hint (``Retry-After``) wins when it gives one. Attempts are bounded
and each retry is logged with what failed.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import asyncpg
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from sync.errors import first_line

logger = logging.getLogger("sync.retry")

# SQLSTATEs worth a second try: the transaction lost a race or the server was briefly unavailable.
TRANSIENT_SQLSTATES = frozenset(
    {
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "53300",  # too_many_connections
        "57P01",  # admin_shutdown
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now
        "55P03",  # lock_not_available (lock_timeout)
    }
)
QUERY_CANCELED = "57014"
LOCK_NOT_AVAILABLE = "55P03"

LOCK_TIMEOUT_S = 3
"""How long one statement waits for a lock another session holds before it is reported and retried."""

DEFAULT_ATTEMPTS = 6
DEFAULT_INITIAL_WAIT = 0.5
DEFAULT_MAX_WAIT = 30.0

# Connecting to a server that restarts or fails over: about 15 s of tries before giving up.
CONNECT_ATTEMPTS = 10
CONNECT_MAX_WAIT = 4.0


def is_transient_db_error(exc: BaseException) -> bool:
    """True when ``exc`` is a database failure that retrying the same transaction may cure.

    Works for asyncpg and psycopg errors alike (both carry ``sqlstate``). A cancelled statement counts
    only when a timeout cancelled it: a user's Ctrl-C or ``pg_cancel_backend`` must stop the run.
    """
    if isinstance(exc, (asyncpg.PostgresConnectionError, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, asyncpg.InterfaceError) and "connection" in str(exc).lower():
        return True  # "connection is closed" / "connection was closed in the middle of operation"
    if isinstance(exc, (asyncpg.InterfaceError, asyncpg.InternalClientError)) and (
        "another operation" in str(exc).lower()
    ):
        # A connection that died while idle is noticed late: its next call finds the protocol stuck
        # ("another operation is in progress"). The connection is unusable; a fresh one is the cure.
        return True
    sqlstate = getattr(exc, "sqlstate", None)
    if not isinstance(sqlstate, str):
        return False
    if sqlstate.startswith("08") or sqlstate in TRANSIENT_SQLSTATES:
        return True
    return sqlstate == QUERY_CANCELED and "timeout" in str(exc).lower()


def is_transient_connect_error(exc: BaseException) -> bool:
    """True when a new connection failed because the server is restarting, failing over or full.

    Connection refused, "the database system is starting up" / "is shutting down" (57P03), too many
    connections, a connection cut during the handshake. A name that does not resolve, a refused login
    or a server that does not answer at all (the connect timeout) are not: retrying cannot cure them.
    """
    if isinstance(exc, (socket.gaierror, TimeoutError)):
        return False
    if isinstance(exc, OSError) and not isinstance(exc, ConnectionError):
        # asyncpg tries each address of a host and reports them together in a plain OSError.
        return "Connect call failed" in str(exc) or exc.errno in (
            errno.ECONNREFUSED,
            errno.ECONNRESET,
        )
    return is_transient_db_error(exc)


def retrying(
    predicate: Callable[[BaseException], bool] = is_transient_db_error,
    *,
    attempts: int = DEFAULT_ATTEMPTS,
    initial_wait: float = DEFAULT_INITIAL_WAIT,
    max_wait: float = DEFAULT_MAX_WAIT,
    wait_hint: Callable[[BaseException], float | None] | None = None,
    what: str = "operation",
) -> AsyncRetrying:
    """An ``AsyncRetrying`` that retries exceptions matching ``predicate``, then re-raises the last one.

    ``attempts`` bounds the tries (the first included). Waits are exponential with full jitter between
    ``initial_wait`` and ``max_wait`` seconds; ``wait_hint`` may return a server-given delay for an
    exception (capped at ``max_wait``), which replaces the computed one. ``what`` names the work in the
    log line of each retry. Use as ``async for attempt in retrying(...): with attempt: ...``.
    """
    backoff = wait_random_exponential(multiplier=initial_wait, max=max_wait)

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        hinted = wait_hint(exc) if wait_hint is not None and exc is not None else None
        return min(hinted, max_wait) if hinted is not None else backoff(state)

    def log_retry(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        logger.warning(
            "%s failed (attempt %d of %d): %s; retrying in %.1f s",
            what,
            state.attempt_number,
            attempts,
            _describe(exc),
            delay,
        )

    return AsyncRetrying(
        retry=retry_if_exception(predicate),
        stop=stop_after_attempt(attempts),
        wait=wait,
        before_sleep=log_retry,
        reraise=True,
    )


async def bound_lock_waits(conn: asyncpg.Connection, *, local: bool) -> None:
    """Make ``conn`` give up on a lock after LOCK_TIMEOUT_S (55P03, then retried with backoff).

    ``local``: for the current transaction only (what a transaction-mode pooler allows), else for
    the session.
    """
    await conn.execute("SELECT set_config('lock_timeout', $1, $2)", f"{LOCK_TIMEOUT_S}s", local)


async def lock_wait_line(conn: asyncpg.Connection, tables: Sequence[str], waited: float) -> str:
    """Who holds the lock a statement on ``tables`` gave up waiting for, in one line for the log."""
    try:
        holder = await conn.fetchrow(
            "SELECT format('%I.%I', n.nspname, c.relname) AS name, l.pid FROM pg_locks AS l "
            "JOIN pg_class AS c ON c.oid = l.relation JOIN pg_namespace AS n ON n.oid = c.relnamespace "
            "WHERE l.locktype = 'relation' AND l.granted AND l.pid <> pg_backend_pid() "
            "AND l.relation IN (SELECT to_regclass(t) FROM unnest($1::text[]) AS t) "
            "AND l.mode IN ('ShareLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock') "
            "ORDER BY l.mode = 'AccessExclusiveLock' DESC LIMIT 1",
            list(tables),
        )
    except (asyncpg.PostgresError, asyncpg.InterfaceError):
        holder = None  # the connection went too: the retry reconnects
    if holder is None:
        return f"waiting for a lock on {tables[0]} held by another session ({waited:.0f} s)"
    return f"waiting for a lock on {holder['name']} held by pid {holder['pid']} ({waited:.0f} s)"


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "no exception"
    return f"{type(exc).__name__}: {first_line(exc)}" if str(exc).strip() else type(exc).__name__


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` header's wait in seconds (delta-seconds or an HTTP date); None when absent."""
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
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)
