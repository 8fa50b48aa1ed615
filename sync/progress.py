"""Progress of a run: a bar for the auth import and per table on a terminal, plain log lines elsewhere
(CI, pipes), every ``SYNC_PROGRESS_EVERY`` seconds (5 by default) and once more at the end with the
real counts."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

log = logging.getLogger("sync")

MB = 1024 * 1024
FILES = "files"
USERS = "auth users"


def log_every() -> float:
    """Seconds between two plain progress lines of one table (``SYNC_PROGRESS_EVERY``, default 5)."""
    try:
        return max(float(os.environ.get("SYNC_PROGRESS_EVERY", "5")), 0.0)
    except ValueError:
        return 5.0


class RunProgress:
    """Receives ``(table, rows)`` after each committed batch; totals come from the window counts.

    The auth import reports through :meth:`users_total` and :meth:`users` (users settled, of them created).
    """

    def __init__(self, console: Console | None, totals: dict[str, int | None]) -> None:
        """``console``: where progress shows (bars on a terminal, else plain log lines); None: nowhere."""
        self.console = console
        self.totals = totals
        self.enabled = console is not None
        self.live = console is not None and console.is_terminal
        self._bars: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        self._done: dict[str, int] = {}
        self._last_log: dict[str, float] = {}
        self._started: dict[str, float] = {}
        self._updated: dict[str, float] = {}
        self._logged: dict[str, int] = {}
        self._files_total = (0, 0)
        self._files_done = (0, 0)
        self._resumed_at: dict[str, int] = {}
        self._created = 0
        self._every = log_every()

    @property
    def wants_totals(self) -> bool:
        """Live bars show an ETA, which needs each table's row count first."""
        return self._bars is not None

    def total(self, table: str, rows: int) -> None:
        """The number of rows ``table``'s copy will read."""
        self.totals[table] = rows
        if self._bars is not None and table in self._tasks:
            self._bars.update(self._tasks[table], total=rows)

    def begin(self, table: str, rows_done: int) -> None:
        """``table``'s copy starts; ``rows_done`` were committed by an earlier attempt of the run."""
        self._done[table] = rows_done
        self._resumed_at[table] = rows_done
        self._started[table] = time.monotonic()
        self._last_log[table] = time.monotonic()
        if self._bars is not None and table not in self._tasks:
            self._tasks[table] = self._bars.add_task(
                table, total=self.totals.get(table), completed=rows_done, unit=_unit(table)
            )

    def __call__(self, table: str, rows: int) -> None:
        self._done[table] = self._done.get(table, 0) + rows
        self._started.setdefault(table, time.monotonic())
        self._updated[table] = time.monotonic()
        if not self.enabled:
            return
        if self._bars is not None:
            if table not in self._tasks:
                self._tasks[table] = self._bars.add_task(
                    table, total=self.totals.get(table), unit=_unit(table)
                )
            self._bars.update(self._tasks[table], completed=self._done[table], description=self._label(table))
            return
        now = time.monotonic()
        if now - self._last_log.get(table, 0.0) >= self._every:
            self._last_log[table] = now
            self._log(table, now)

    def users_total(self, users: int) -> None:
        """The auth import starts: ``users`` production users to match, then create or bring up to date."""
        self._created = 0
        self.totals[USERS] = users
        self.begin(USERS, 0)

    def users(self, users: int, created: int) -> None:
        """``users`` more production users settled by the auth import; ``created`` of them are new."""
        self._created += created
        self(USERS, users)

    def _label(self, table: str) -> str:
        return f"{USERS} ({self._created:,} created)" if table == USERS else table

    def _log(self, table: str, now: float) -> None:
        """One plain line with the rows done so far (of the total when known) and this attempt's speed."""
        elapsed = max(now - self._started[table], 1e-6)
        total = self.totals.get(table)
        of = f" of {total:,}" if total is not None else ""
        unit = _unit(table)
        done = self._logged[table] = self._done[table]
        created = f", {self._created:,} created" if table == USERS else ""
        speed = (done - self._resumed_at.get(table, 0)) / elapsed
        log.info("%s: %s%s %s%s (%.0f %s/s)", table, f"{done:,}", of, unit, created, speed, unit)

    def files_total(self, objects: int, size: int) -> None:
        """The storage stage's work ahead: ``objects`` files of ``size`` bytes in all."""
        self._files_total = (objects, size)
        self._files_done = (0, 0)
        self._started[FILES] = time.monotonic()
        if self._bars is not None:
            self._tasks[FILES] = self._bars.add_task(self._files_label(), total=size or None, unit="bytes")

    def files(self, objects: int, size: int) -> None:
        """``objects`` more files settled, ``size`` more bytes sent (the storage stage's progress)."""
        done = self._files_done = (self._files_done[0] + objects, self._files_done[1] + size)
        if not self.enabled:
            return
        if self._bars is not None and FILES in self._tasks:
            self._bars.update(self._tasks[FILES], completed=done[1], description=self._files_label())
            return
        now = time.monotonic()
        if now - self._last_log.get(FILES, 0.0) >= self._every:
            self._last_log[FILES] = now
            elapsed = max(now - self._started.get(FILES, now), 1e-6)
            log.info("%s (%.1f MB/s)", self._files_label(), done[1] / MB / elapsed)

    def _files_label(self) -> str:
        (objects, size), done = self._files_total, self._files_done
        return f"files {done[0]:,}/{objects:,} ({done[1] / MB:,.1f}/{size / MB:,.1f} MB)"

    @contextmanager
    def shown(self) -> Iterator[RunProgress]:
        """Show live bars for the duration (on a terminal only)."""
        if not self.live:
            yield self
            if self.enabled:  # every table's final count, however fast it went, at its own last speed
                for table, done in self._done.items():
                    if self._logged.get(table) != done:
                        self._log(table, self._updated.get(table, time.monotonic()))
            return
        from sync.progress_bars import bars  # the bars' code loads only where a terminal shows them

        self._bars = bars(self.console)
        with self._bars:
            yield self
        self._bars = None


def _unit(table: str) -> str:
    return "users" if table == USERS else "rows"
