"""``sync run --follow``: catch-up runs one after another until Ctrl-C, so the target stays close.

Each round is a whole run (:func:`sync.run.run_sync`): its own lock, snapshot, checkpoints and run
record, so a round is exactly what a plain ``sync run`` would have done at that moment. The first round
takes the user's options (``--since`` included: a windowed first run); every later round is a catch-up
from the round before it.

Ctrl-C (SIGINT) between rounds ends the follow at once: every round so far is complete. During a round
it cancels the round: the batch in flight rolls back (its rows and its checkpoint are one transaction),
the committed batches stay, and the run is recorded ``interrupted``, so the next ``sync run`` resumes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import datetime, timedelta

from sync.errors import EXIT_INTERRUPTED, EXIT_OK, UsageError
from sync.models import Model
from sync.run import RunOptions, RunReport

log = logging.getLogger("sync")

DEFAULT_EVERY = timedelta(seconds=30)

_DURATION = re.compile(r"(?:(?P<h>\d+)h)?(?:(?P<m>\d+)m)?(?:(?P<s>\d+)s)?")


def parse_every(text: str) -> timedelta:
    """A round interval: ``30s``, ``2m``, ``1m30s``, ``1h``, or a bare number of seconds.

    UsageError (one line) for anything else, and for zero: a round would start again at once, forever.
    """
    value = text.strip().lower()
    if value.isdigit():
        every = timedelta(seconds=int(value))
    else:
        parts = _DURATION.fullmatch(value)
        if not value or parts is None:
            raise UsageError(
                f"--every {text!r} is not a duration: write it like 30s, 2m, 1m30s or 1h (or seconds)."
            )
        every = timedelta(**{unit: int(parts[key] or 0) for key, unit in _UNITS.items()})
    if every <= timedelta(0):
        raise UsageError(f"--every {text!r} is not a duration above zero: write it like 30s, 2m or 1m30s.")
    return every


_UNITS = {"h": "hours", "m": "minutes", "s": "seconds"}


class FollowRound(Model):
    """One round of ``sync run --follow``: what it brought, and how far behind production the target was."""

    round: int
    run_id: int
    resumed: bool
    started_at: datetime
    rows: int
    """Table rows inserted or updated on the target."""
    users: int
    """Auth users created or updated on the target."""
    production_deletes: int
    """Rows and users production deleted that the target still holds (found this round)."""
    deleted: int
    """Of those, deleted (or soft-deleted) on the target this round (``--deletes apply``/``soft``)."""
    quarantined: int
    lag_seconds: float | None
    """At most how long the changes this round brought had waited: the time from the previous round's
    snapshot of production to this round's (the source's clock); 0 when the round found nothing to
    bring; None for a first round without an earlier run to measure from (a window or whole tables)."""
    seconds: float
    exit_code: int


class FollowEnd(Model):
    """How a follow ended: after ``rounds`` rounds, between two (clean) or in the middle of one."""

    rounds: int
    interrupted_round: bool
    exit_code: int


RunRound = Callable[[RunOptions], Awaitable[RunReport]]


def _round(number: int, report: RunReport, started_at: datetime, mark: datetime | None) -> FollowRound:
    rows = sum(t.inserted + t.updated for t in report.tables)
    users = report.auth.created + report.auth.updated if report.auth else 0
    deletes = report.deletes
    deleted = deletes.deleted if deletes else 0
    lag = None
    if mark is not None and report.high_water is not None:
        lag = max((report.high_water - mark).total_seconds(), 0.0) if rows or users or deleted else 0.0
    return FollowRound(
        round=number,
        run_id=report.run_id,
        resumed=report.resumed,
        started_at=started_at,
        rows=rows,
        users=users,
        production_deletes=deletes.found if deletes else 0,
        deleted=deleted,
        quarantined=report.quarantined,
        lag_seconds=lag,
        seconds=report.seconds,
        exit_code=report.exit_code,
    )


async def follow(
    run_round: RunRound, options: RunOptions, every: timedelta, on_round: Callable[[FollowRound], None]
) -> FollowEnd:
    """Run rounds every ``every`` (a round that takes longer is followed at once) until SIGINT.

    ``run_round`` runs one round with the options it is given; ``on_round`` hears of each finished one.
    Errors of a round end the follow as they would end a plain run. Exit code: the last round's (0, or
    3 when it left rows in quarantine) when stopped between rounds, 130 when a round was cut short.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    current: asyncio.Task[RunReport] | None = None

    def interrupt() -> None:
        if stop.is_set():
            return
        stop.set()
        if current is not None and not current.done():
            log.warning("stopping: the round in flight ends at its batch boundary; committed batches stay")
            current.cancel()

    loop.add_signal_handler(signal.SIGINT, interrupt)
    number, exit_code = 0, EXIT_OK
    mark: datetime | None = None
    try:
        while not stop.is_set():
            number += 1
            began = time.monotonic()
            started_at = datetime.now().astimezone()
            round_options = options if number == 1 else replace(options, since=None, restart=False)
            current = asyncio.ensure_future(run_round(round_options))
            try:
                report = await current
            except asyncio.CancelledError:
                if not stop.is_set():
                    raise  # cancelled from outside, not by Ctrl-C
                return FollowEnd(rounds=number, interrupted_round=True, exit_code=EXIT_INTERRUPTED)
            if number == 1 and options.since is None and report.since is not None:
                mark = report.since + options.overlap  # the earlier run's snapshot this catch-up reads from
            on_round(_round(number, report, started_at, mark))
            mark, exit_code = report.high_water, report.exit_code
            pause = every.total_seconds() - (time.monotonic() - began)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=max(pause, 0.0))
        return FollowEnd(rounds=number, interrupted_round=False, exit_code=exit_code)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
