"""Progress of a run: a bar per table on a terminal, plain log lines elsewhere (CI, pipes)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

log = logging.getLogger("sync")

LOG_EVERY_S = 5.0
MB = 1024 * 1024
FILES = "files"


class RowsPerSecond(ProgressColumn):
    """The table's copy speed (MB/s for the files' bar, which counts bytes)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if task.fields.get("unit") == "bytes":
            text = f"{speed / MB:>8,.1f} MB/s" if speed else "         … MB/s"
        else:
            text = f"{speed:>8,.0f} rows/s" if speed else "       … rows/s"
        return Text(text, style="progress.data.speed")


class RunProgress:
    """Receives ``(table, rows)`` after each committed batch; totals come from the window counts."""

    def __init__(self, console: Console, totals: dict[str, int | None], *, enabled: bool = True) -> None:
        self.console = console
        self.totals = totals
        self.enabled = enabled
        self.live = enabled and console.is_terminal
        self._bars: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        self._done: dict[str, int] = {}
        self._last_log: dict[str, float] = {}
        self._started: dict[str, float] = {}
        self._files_total = (0, 0)
        self._files_done = (0, 0)
        self._resumed_at: dict[str, int] = {}

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
            self._tasks[table] = self._bars.add_task(table, total=self.totals.get(table), completed=rows_done)

    def __call__(self, table: str, rows: int) -> None:
        self._done[table] = self._done.get(table, 0) + rows
        self._started.setdefault(table, time.monotonic())
        if not self.enabled:
            return
        if self._bars is not None:
            if table not in self._tasks:
                self._tasks[table] = self._bars.add_task(table, total=self.totals.get(table))
            self._bars.update(self._tasks[table], completed=self._done[table])
            return
        now = time.monotonic()
        if now - self._last_log.get(table, 0.0) >= LOG_EVERY_S:
            self._last_log[table] = now
            self._log(table, now)

    def _log(self, table: str, now: float) -> None:
        """One plain line with the rows done so far (of the total when known) and this attempt's speed."""
        elapsed = max(now - self._started[table], 1e-6)
        total = self.totals.get(table)
        of = f" of {total:,}" if total is not None else ""
        speed = (self._done[table] - self._resumed_at.get(table, 0)) / elapsed
        log.info("%s: %s%s rows (%.0f rows/s)", table, f"{self._done[table]:,}", of, speed)

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
        if now - self._last_log.get(FILES, 0.0) >= LOG_EVERY_S:
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
            if self.enabled:  # every table's final count, however fast it went
                now = time.monotonic()
                for table in self._done:
                    self._log(table, now)
            return
        self._bars = Progress(
            TextColumn("{task.description:<28}"),
            BarColumn(),
            MofNCompleteColumn(),
            RowsPerSecond(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        with self._bars:
            yield self
        self._bars = None
