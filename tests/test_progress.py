"""Progress says real numbers: resumed bars start from the rows already done, logs carry real counts."""

from __future__ import annotations

import io
import logging

from rich.console import Console

from sync.progress import RunProgress


def test_a_resumed_tables_bar_starts_from_the_rows_an_earlier_attempt_committed():
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    progress = RunProgress(console, {"public.profiles": 1000})
    with progress.shown():
        progress.begin("public.profiles", 900)
        progress("public.profiles", 100)
        (task,) = progress._bars.tasks  # type: ignore[union-attr]
        assert (task.completed, task.total) == (1000, 1000)
        assert task.finished


def test_without_a_terminal_each_table_logs_its_real_count_and_never_a_bare_zero(caplog):
    console = Console(file=io.StringIO(), force_terminal=False)
    progress = RunProgress(console, {})
    with caplog.at_level(logging.INFO, logger="sync"), progress.shown():
        progress.begin("public.notes", 0)
        for _ in range(3):
            progress("public.notes", 500)
    lines = [r.getMessage() for r in caplog.records]
    assert not any(line.startswith("public.notes: 0 rows") for line in lines), lines
    assert lines[-1].startswith("public.notes: 1,500 rows ("), lines
