"""Errors a user can cause or meet, each with the exit code the CLI returns for it."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_QUARANTINED = 3
EXIT_DIFFERENT = 4
"""``sync verify``/``cutover``: something in scope is missing, different, deleted or not landed."""
EXIT_INTERRUPTED = 130
"""``sync run --follow``: Ctrl-C cut a round short (its committed batches are kept; a rerun resumes it)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def first_cause(exc: BaseException) -> BaseException:
    """The first failure inside ``exc``: concurrent stages (tables copied in parallel) raise groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


class SyncError(Exception):
    """A failure explained in one sentence to the user; ``exit_code`` is what the CLI returns."""

    exit_code = EXIT_FAILED


class UsageError(SyncError):
    """Bad input: options, mapping files, DSNs, privileges, or a plan that would lose data."""

    exit_code = EXIT_USAGE


class ConnectError(UsageError):
    """A database could not be reached or refused the login; the message names the side."""


class MappingError(UsageError):
    """A mapping file is malformed; the message names the file, the table and the key."""


class PlanError(UsageError):
    """The plan would lose data or cannot be executed; ``problems`` lists every reason at once."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(
            f"the plan has {len(problems)} problem(s); nothing was written:\n  - " + "\n  - ".join(problems)
        )


class LockedError(SyncError):
    """Another run holds the target's run lock."""


class LockLostError(SyncError):
    """The run lock's connection ended and the lock could not be taken again: the run stopped writing."""


# SQLSTATEs that no rerun can fix, with what to change first: a missing privilege, a read-only
# database, or an object the run needs that is not there (class 42 covers both of the last kind).
_NOT_TRANSIENT = {
    "42501": "grant the privilege it names to the role, then run the same command again",
    "25006": "the database is read-only for this role: connect to the primary as a role that may write",
    "42": "the database's shape or privileges must change first; `sync plan` lists what the run needs",
    "3D": "the database does not exist",
}


def cause_of(exc: BaseException) -> tuple[int, str]:
    """The exit code a database failure deserves and what to do about it.

    EXIT_USAGE when the role or the schema must change first (privileges, read-only, missing objects),
    EXIT_FAILED when running the same command again can succeed (it resumes from the checkpoints).
    """
    sqlstate = str(getattr(exc, "sqlstate", "") or "")
    for prefix in (sqlstate, sqlstate[:2]):
        if prefix and prefix in _NOT_TRANSIENT:
            return EXIT_USAGE, _NOT_TRANSIENT[prefix]
    return EXIT_FAILED, "rerun the same command to resume from the checkpoints"
