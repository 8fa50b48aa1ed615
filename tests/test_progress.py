"""Progress says real numbers: resumed bars start from the rows already done, logs carry real counts."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

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


def test_on_a_terminal_the_auth_import_has_a_bar_of_users_with_those_created():
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    progress = RunProgress(console, {})
    with progress.shown():
        progress.users_total(4082)
        progress.users(2000, 1500)
        progress.users(2082, 1452)
        (task,) = progress._bars.tasks  # type: ignore[union-attr]
        assert (task.completed, task.total, task.fields["unit"]) == (4082, 4082, "users")
        assert task.description == "auth users (2,952 created)"
    assert "users/s" in console.file.getvalue()  # type: ignore[attr-defined]


def test_without_a_terminal_the_auth_import_logs_users_settled_and_created_batch_by_batch(
    caplog, monkeypatch
):
    monkeypatch.setenv("SYNC_PROGRESS_EVERY", "0")
    progress = RunProgress(Console(file=io.StringIO(), force_terminal=False), {})
    with caplog.at_level(logging.INFO, logger="sync"), progress.shown():
        progress.users_total(4082)
        progress.users(2000, 872)
        progress.users(2082, 2080)
    lines = [r.getMessage().split(" (")[0] for r in caplog.records]
    assert lines == [
        "auth users: 2,000 of 4,082 users, 872 created",
        "auth users: 4,082 of 4,082 users, 2,952 created",
    ]


def test_without_a_terminal_a_run_logs_the_auth_imports_real_counts_as_it_goes(seed_dbs):
    source, target = seed_dbs
    shipped = Path(__file__).resolve().parent.parent / "mappings" / "sync.toml"
    command = [sys.executable, "-m", "sync", "run", "--since", "2024-11-18", "--mapping", str(shipped)]
    env = {**os.environ, "SYNC_SOURCE_URL": source.url, "SYNC_TARGET_URL": target.url}
    # Every batch logs (instead of every 5 s), so the lines do not depend on how fast the machine is.
    env["SYNC_PROGRESS_EVERY"] = "0"
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)

    assert done.returncode == 0, done.stderr
    users = [line for line in done.stderr.splitlines() if line.startswith("auth users: ")]
    counts = [
        int(re.match(r"auth users: ([\d,]+) of 4,082 users", line)[1].replace(",", "")) for line in users
    ]
    assert counts == sorted(set(counts)) and counts[-1] == 4082, users  # a line per batch, each count once
    assert users[-1].startswith("auth users: 4,082 of 4,082 users, 2,952 created ("), users
    profiles = [line for line in done.stderr.splitlines() if line.startswith("public.profiles: ")]
    assert profiles[-1].startswith("public.profiles: 3,331 rows ("), profiles  # 2,991 in the window + parents
    assert not re.search(r": 0 (rows|users) \(", done.stderr), done.stderr
