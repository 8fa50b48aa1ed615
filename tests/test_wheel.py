"""The tool installs alone: its wheel holds no dev kit, and installed from it, `sync` plans the demo.

The wheel is built from this checkout and installed into a fresh virtualenv; the dependencies are this
environment's own (the new environment reads them through a path file), so nothing is downloaded.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

# One worker builds the wheel and its virtualenv once for all of this file's tests.
pytestmark = pytest.mark.xdist_group("wheel")

PROJECT = Path(__file__).resolve().parent.parent


def _run(*argv: str | Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )


def _purelib(python: Path, cwd: Path) -> Path:
    """Where ``python`` installs packages."""
    found = _run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=cwd)
    return Path(found.stdout.strip())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built as `pip wheel .` builds it."""
    out = tmp_path_factory.mktemp("wheel")
    built = _run(sys.executable, "-m", "pip", "wheel", PROJECT, "-w", out, "--no-deps", "-q", cwd=out)
    assert built.returncode == 0, built.stderr
    (found,) = out.glob("supabase_sync-*.whl")
    return found


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the wheel installed; returns its ``bin`` folder."""
    home = tmp_path_factory.mktemp("venv")
    assert _run(sys.executable, "-m", "venv", "--without-pip", home, cwd=home).returncode == 0
    python = home / "bin" / "python"
    installed = _run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "--no-deps",
        "--no-index",
        "-q",
        wheel,
        cwd=home,
    )
    assert installed.returncode == 0, installed.stderr
    # This environment's dependencies, read after the new environment's own packages; path files are
    # not read from a folder named in a path file, so this checkout's editable install stays out.
    deps = dict.fromkeys([sysconfig.get_path("purelib"), *site.getsitepackages()])
    (_purelib(python, home) / "dependencies.pth").write_text("\n".join(deps) + "\n")
    return home / "bin"


def test_the_wheel_holds_the_tool_and_its_files_but_not_the_dev_kit(wheel: Path):
    names = zipfile.ZipFile(wheel).namelist()
    assert "sync/cli/run.py" in names and "sync/render.py" in names
    assert "sync/sql/state.sql" in names
    assert "sync/mappings/sync.toml" in names
    assert not [n for n in names if n.startswith("devkit/")]
    for kit in ("scenario.py", "demo.py", "testbed.py", "embedded.py"):
        assert f"sync/{kit}" not in names
    assert not [n for n in names if "supabase/" in n or "sql/scenario/" in n]


def test_the_installed_tool_runs_from_its_own_package(venv: Path, tmp_path: Path):
    where = _run(venv / "python", "-c", "import sync; print(sync.__file__)", cwd=tmp_path)
    assert where.stdout.strip().startswith(str(venv.parent)), where.stdout
    kit = _run(venv / "python", "-c", "import devkit", cwd=tmp_path)
    assert kit.returncode != 0 and "No module named 'devkit'" in kit.stderr
    result = _run(venv / "sync", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for command in ("plan", "run", "status", "verify", "quarantine", "demo"):
        assert command in result.stdout


def test_sync_demo_without_the_dev_kit_says_in_one_line_how_to_get_it(venv: Path, tmp_path: Path):
    result = _run(venv / "sync", "demo", "--no-sync", cwd=tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "development kit" in result.stderr and "make demo" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_installed_tool_plans_the_demo_with_its_shipped_mapping(venv: Path, tmp_path: Path, seed_dbs):
    source, target = seed_dbs
    mapping = _purelib(venv / "python", tmp_path) / "sync" / "mappings" / "sync.toml"
    result = _run(
        venv / "sync", "plan", "--source", source.url, "--target", target.url,
        "--mapping", mapping, "--since", "2024-11-18", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "users: 4,082 in source, 1,133 in target" in result.stdout
    assert "public.financing_requests" in result.stdout
