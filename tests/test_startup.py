"""`sync run` loads what it uses and nothing else: the Storage stage, the follow loop, the admin API's
client and rich (for `--json`) only where the command needs them.

Each check runs the real command (or import) in a fresh interpreter and reads the modules it loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from queries import seed_run_args

# Run as ``python -c``: ``sync`` with the given arguments, then the loaded modules' names written to a
# file by an exit handler (the program runs them before it leaves).
LOADED = """
import atexit, json, runpy, sys
out = sys.argv[1]
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(sys.modules))))
sys.argv = ["sync", *sys.argv[2:]]
runpy.run_module("sync", run_name="__main__")
"""

NEVER_IN_A_RUN = (
    "sync.storage.stage",
    "sync.storage.transfer",
    "sync.storage.select",
    "sync.follow",
    "sync.verify",
    "sync.cutover",
    "sync.preview",
    "sync.plan.report",
    "sync.auth.admin_api",
    "supabase",
    "httpx",
    "rich.progress",
    "devkit",
)
"""Modules a single run without Storage keys, the admin API or a terminal never uses (``sync plan``'s
report models included)."""


def loaded_by(args: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run ``sync ARGS`` in a fresh interpreter: the finished process and the modules it had loaded."""
    out = tmp_path / "modules.json"
    done = subprocess.run(
        [sys.executable, "-c", LOADED, str(out), *args], capture_output=True, text=True, timeout=300
    )
    return done, set(json.loads(out.read_text())) if out.exists() else set()


def offenders(modules: set[str], banned: tuple[str, ...]) -> list[str]:
    """The modules of ``banned`` (or inside one of those packages) that were loaded."""
    return sorted(m for m in modules if any(m == b or m.startswith(f"{b}.") for b in banned))


def test_importing_the_run_command_loads_no_other_commands_work_nor_rich():
    code = "import json, sys, sync.cli.run; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    modules = set(json.loads(done.stdout))

    assert "sync.cli.run" in modules and "asyncpg" in modules  # the command and its engine did load
    assert offenders(modules, (*NEVER_IN_A_RUN, "rich", "sync.render")) == []


def test_a_json_run_loads_neither_rich_nor_storage_follow_or_the_admin_api_client(seed_dbs, tmp_path):
    done, modules = loaded_by([*seed_run_args(*seed_dbs), "--json"], tmp_path)

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["auth"]["created"] > 0  # the run did its work: users were created
    assert "sync.copy.table" in modules and "sync.auth.direct" in modules
    assert offenders(modules, (*NEVER_IN_A_RUN, "rich", "sync.render")) == []


def test_a_run_that_prints_for_people_loads_rich_but_not_the_bars_without_a_terminal(seed_dbs, tmp_path):
    done, modules = loaded_by(seed_run_args(*seed_dbs), tmp_path)

    assert done.returncode == 0, done.stderr
    assert "auth import (direct" in done.stdout and "Tables" in done.stdout  # the summary, by rich
    assert "rich.console" in modules and "sync.render" in modules
    assert offenders(modules, NEVER_IN_A_RUN) == []
