"""The live bars :class:`sync.progress.RunProgress` shows on a terminal (loaded only there)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from sync.progress import MB


class RowsPerSecond(ProgressColumn):
    """The table's copy speed (MB/s for the files' bar, which counts bytes; users/s for the users')."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "rows")
        if unit == "bytes":
            text = f"{speed / MB:>8,.1f} MB/s" if speed else "         … MB/s"
        else:
            text = f"{speed:>8,.0f} {unit}/s" if speed else f"{'…':>8} {unit}/s"
        return Text(text, style="progress.data.speed")


def bars(console: Console) -> Progress:
    """One bar per table (and for the users, the files): rows done of the total, speed, time left."""
    return Progress(
        TextColumn("{task.description:<28}"),
        BarColumn(),
        MofNCompleteColumn(),
        RowsPerSecond(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
