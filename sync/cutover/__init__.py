"""``sync cutover``: the final catch-up, then verify, then the seed's success metrics as measured.

Production is in maintenance mode (the user says so). The catch-up is :func:`sync.run.run_sync` without
``--since``; the verification is :func:`sync.verify.sides.verify_sides`, everything production holds.
The metrics are read off their reports: production users who can sign in with a password there and on
the target, rows lost (missing or different, users included), rows and users still in quarantine,
files (when the mapping names Storage objects), whether everything else verify checks is equal
(production deletes, orphans), and the downtime: the command's wall time from its start to verified.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from sync.connect import Endpoint
from sync.copy import Progress
from sync.errors import EXIT_DIFFERENT, EXIT_OK, UsageError
from sync.mapping import Mapping
from sync.models import Model
from sync.modes import DeleteMode
from sync.run import AuthStage, RunOptions, RunReport, run_sync
from sync.storage.stage import StorageStage
from sync.verify import VerifyReport
from sync.verify.sides import verify_sides


class Metric(Model):
    """One success metric: what was measured, what it must be, and whether it is."""

    name: str
    measured: str
    goal: str
    met: bool


class CatchUp(Model):
    """What the final catch-up brought."""

    run_id: int
    since: datetime | None
    rows_written: int
    users_created: int
    users_updated: int
    production_deletes: int
    files_copied: int | None
    quarantined: int
    seconds: float


class CutoverReport(Model):
    """``sync cutover --report FILE``: both sides, the catch-up, the verification and the metrics.

    It holds counts, table names and keys; never a password, hash, token or key.
    """

    source: str
    target: str
    started_at: datetime
    verified_at: datetime
    downtime_seconds: float
    catch_up: CatchUp
    metrics: list[Metric]
    verify: VerifyReport

    @property
    def ok(self) -> bool:
        return all(m.met for m in self.metrics)

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.ok else EXIT_DIFFERENT

    def unmet(self) -> list[str]:
        """The names of the metrics not met."""
        return [m.name for m in self.metrics if not m.met]


Shown = Callable[[RunReport], None]
"""Told the catch-up's report as soon as it is done (before the verification starts)."""


async def cutover(
    source: Endpoint,
    target: Endpoint,
    mapping: Mapping,
    *,
    deletes: DeleteMode = DeleteMode.REPORT,
    auth_stage: AuthStage | None = None,
    storage_stage: StorageStage | None = None,
    progress: Progress | None = None,
    caught_up: Shown | None = None,
) -> CutoverReport:
    """The final catch-up, the verification of everything production holds, and the metrics."""
    started, started_at = time.perf_counter(), datetime.now(UTC)
    run = await run_sync(
        source,
        target,
        mapping,
        RunOptions(deletes=deletes),
        auth_stage=auth_stage,
        progress=progress,
        storage_stage=storage_stage,
    )
    if caught_up is not None:
        caught_up(run)
    sides: list[str] = []
    checks = await verify_sides(source, target, mapping, None, named=lambda s, t: sides.extend((s, t)))
    # To the millisecond, once: the metric and the report's figure print the same tenth.
    downtime = round(time.perf_counter() - started, 3)
    return CutoverReport(
        source=sides[0],
        target=sides[1],
        started_at=started_at,
        verified_at=datetime.now(UTC),
        downtime_seconds=downtime,
        catch_up=_catch_up(run),
        metrics=measure(run, checks, downtime),
        verify=checks,
    )


def _catch_up(run: RunReport) -> CatchUp:
    return CatchUp(
        run_id=run.run_id,
        since=run.since,
        rows_written=sum(t.written for t in run.tables),
        users_created=run.auth.created if run.auth else 0,
        users_updated=run.auth.updated if run.auth else 0,
        production_deletes=run.deletes.found if run.deletes else 0,
        files_copied=run.storage.copied_total.objects if run.storage else None,
        quarantined=run.quarantined,
        seconds=round(run.seconds, 3),
    )


def measure(run: RunReport, checks: VerifyReport, downtime: float) -> list[Metric]:
    """The seed's success metrics, from the catch-up's and the verification's reports."""
    metrics: list[Metric] = []

    def add(name: str, measured: str, goal: str, met: bool) -> None:
        metrics.append(Metric(name=name, measured=measured, goal=goal, met=met))

    if checks.sign_ins is not None:
        s = checks.sign_ins
        add(
            "users who can sign in on the target",
            f"{s.target:,} of {s.production:,}",
            "all who can on production",
            s.ok,
        )
    in_scope = sum(c.in_scope for c in checks.checks)
    lost = sum(len(c.missing) + len(c.different) for c in checks.checks)
    add(
        "rows lost",
        f"{lost:,} of {in_scope:,} production rows and users (missing or different)",
        "0",
        lost == 0,
    )
    held = sum(len(c.quarantined) for c in checks.checks) + (run.storage.quarantined if run.storage else 0)
    add("quarantined", f"{held:,}", "0", held == 0)
    if checks.files is not None:
        f = checks.files
        equal = f.objects - f.missing - f.different
        add("files", f"{equal:,} of {f.objects:,} on the target, same size and hash", "all", f.ok)
    others = [c.table for c in checks.checks if c.production_deletes or c.orphans]
    add(
        "everything else verify checks",
        "equal" if not others else f"production deletes or orphans in {', '.join(others)}",
        "equal",
        not others,
    )
    add("downtime", f"{downtime:.1f} s", "start to verified", True)
    return metrics


def markdown_path(report: Path) -> Path:
    """Where the Markdown report goes beside the JSON one: ``cutover.json`` → ``cutover.md``."""
    if report.suffix == ".md":
        raise UsageError(f"--report {report}: name the JSON file (the Markdown goes beside it as .md)")
    return report.with_suffix(".md")


def check_report_paths(report: Path) -> tuple[Path, Path]:
    """The JSON and Markdown paths of ``--report``; UsageError (exit 2) before anything runs when they
    cannot be written."""
    md = markdown_path(report)
    for path in (report, md):
        if not path.parent.is_dir():
            raise UsageError(f"--report {report}: the directory {path.parent} does not exist")
        if path.is_dir():
            raise UsageError(f"--report {report}: {path} is a directory")
    return report, md
