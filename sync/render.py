"""What the ``sync`` commands print for people: plans, runs, status, verify results and error lines.

``--json`` output is the reports' own models; everything here is the human form, written with rich.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from sync.status import PROCESS_GONE

if TYPE_CHECKING:
    from sync.auth import AuthReport
    from sync.cutover import CutoverReport
    from sync.deletes import DeletesReport
    from sync.follow import FollowEnd, FollowRound
    from sync.plan import PlanReport
    from sync.run import RunReport
    from sync.status import StatusReport
    from sync.verify import VerifyReport
    from sync.verify.signin import SignIn

# Pipes and CI logs get wide lines rather than tables cut to 80 columns.
console = Console(width=None if sys.stdout.isatty() else 140)
errors = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


def error(message: str) -> None:
    """Print one error line on stderr."""
    # Escaped: messages quote mapping lines such as [tables."public.x"], which are not markup.
    errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def say(text: str = "", style: str | None = None) -> None:
    """Print one line as it is (no markup), in ``style`` when given."""
    console.print(Text(text, style=style or ""), soft_wrap=True)


def endpoints(source: str, target: str) -> None:
    """The two sides a command reads and writes, first thing (never a password)."""
    say(f"source: {source}")
    say(f"target: {target}")


def plan(report: PlanReport) -> None:
    """The plan: both sides, the window, tables in copy order, users, triggers, notes and problems."""
    say(f"source: {report.source} (PostgreSQL {_version(report.source_version)}, {report.source_pool})")
    say(f"target: {report.target} (PostgreSQL {_version(report.target_version)}, {report.target_pool})")
    say(f"mapping: {report.mapping}")
    if report.catch_up and report.since is None:
        say("window: whole tables (no --since and no earlier run: what `sync run` would copy)")
    elif report.catch_up and report.since is not None:
        say(
            f"window: catch-up from the last run, rows whose since-column is at or after "
            f"{report.since.isoformat()} or that a transaction wrote since that run "
            "(what `sync run` without --since would copy)"
        )
    elif report.since is None:
        say("window: whole tables (no --since)")
    else:
        say(f"window: rows whose since-column is at or after {report.since.isoformat()}")
    if report.tables:
        say()
        say("tables, parents first")
        rows = [
            (
                f"{number}.",
                t.name,
                t.key + (f" on {', '.join(t.match_on or t.natural)}" if t.match_on or t.natural else ""),
                "whole table"
                if t.since is None
                else f"since {t.since}" + ("" if t.since_indexed else " (no index)"),
                _rows_in_window(t.window_rows, t.parent_rows, t.collisions),
            )
            for number, t in enumerate(report.tables, start=1)
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        for row in rows:
            say(
                "  "
                + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
                + "  "
                + row[4]
            )
    if report.users:
        u = report.users
        say()
        say(
            f"users: {u.source:,} in source, {u.target:,} in target: {u.to_create:,} to create, "
            f"{u.matched_by_id:,} matched by id, {u.matched_by_email:,} by e-mail (remapped), "
            f"{u.matched_by_phone:,} by phone"
            + (f", {u.set_aside:,} set aside (quarantined)" if u.set_aside else "")
            + f" (auth: {report.auth_mode})"
        )
    triggers = [*report.auth_triggers, *(t for planned in report.tables for t in planned.triggers)]
    modes = {t.name: t.trigger_mode for t in report.tables}
    _section(
        "triggers",
        [
            f"{t.table}: {t.name} {t.timing} → {t.function}()"
            + ("" if t.enabled else " (disabled)")
            + (" — CALLS OUT OF THE DATABASE" if t.reaches_outside else "")
            + (f" [{modes[t.table]}]" if t.table in modes else " [fires for every user created]")
            for t in triggers
        ],
    )
    _section("files (Storage)", report.files)
    _section("drift and new columns", report.notes)
    _section("warnings", report.warnings, "yellow")
    _section(
        "production deletes (`sync run --deletes apply` removes them; development rows are never touched)",
        report.deletes,
        "yellow",
    )
    _section("errors (nothing can run until they are fixed)", report.errors, "bold red")


def _rows_in_window(rows: int | None, parents: int | None, collisions: int | None) -> str:
    if rows is None:
        return ""
    text = f"{rows:,} rows in the window"
    if parents:
        text += f" + {parents:,} parents the window needs"
    if collisions:
        text += f", {collisions:,} of their keys taken by other rows in target"
    return text


def _section(title: str, lines: list[str], style: str | None = None) -> None:
    if lines:
        say()
        say(title, style)
        for line in lines:
            say(f"  - {line}", style)


def _version(number: int) -> str:
    return f"{number // 10000}.{number % 10000}"


def counts(production: dict[str, int], development: dict[str, int]) -> None:
    """Rows per table on both sides of the seed scenario, side by side."""
    table = Table(title="Seed scenario")
    table.add_column("table")
    table.add_column("production (source)", justify="right")
    table.add_column("development (target)", justify="right")
    for name in dict.fromkeys([*production, *development]):
        table.add_row(name, _count(production.get(name)), _count(development.get(name)))
    console.print(table)


def _count(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


def auth(report: AuthReport, shown: int = 20) -> None:
    """The auth import's summary; the quarantine line in red."""
    for line in report.summary(shown=shown):
        say(line, "red" if line.startswith("Quarantined") else None)


def run(report: RunReport) -> None:
    """A run's summary: the window, the auth import, rows per table, sequences and quarantine."""
    since = report.since.isoformat() if report.since else "the beginning (whole tables)"
    say(f"Run {report.run_id}{' (resumed)' if report.resumed else ''}: rows changed since {since}")
    if report.auth is not None:
        auth(report.auth, shown=10)
    table = Table(title="Tables")
    for column in (
        "table",
        "read",
        "of them parents",
        "inserted",
        "updated",
        "remapped",
        "quarantined",
        "rows/s",
    ):
        table.add_column(column, justify="left" if column == "table" else "right", no_wrap=True)
    for t in report.tables:
        rate = f"{t.read / t.seconds:,.0f}" if t.seconds > 0 else "—"
        table.add_row(
            t.table,
            f"{t.read:,}",
            f"{t.parents:,}",
            f"{t.inserted:,}",
            f"{t.updated:,}",
            f"{t.remapped:,}",
            f"{t.quarantined:,}",
            rate,
        )
    console.print(table)
    if report.storage is not None:
        for number, line in enumerate(report.storage.lines()):
            say(line, "red" if number and "Quarantined" in line else None)
    if report.deletes is not None:
        deletes(report.deletes)
    say(f"Sequences moved forward: {report.sequences_moved}. Done in {report.seconds:.1f} s.")
    if report.quarantined:
        say(
            f"{report.quarantined} row(s) quarantined: `sync status --show` lists them; "
            "after fixing the cause, `sync quarantine retry`.",
            "red",
        )


def follow_start(every: timedelta) -> None:
    """What ``sync run --follow`` is about to do."""
    say(f"Following production: a catch-up round every {_duration(every)}; Ctrl-C stops (between batches).")


def follow_round(r: FollowRound) -> None:
    """One line per round: what it brought, production deletes, lag; quarantined rows in red."""
    lag = "—" if r.lag_seconds is None else f"{r.lag_seconds:.1f} s"
    deletes = f"{r.production_deletes:,} production deletes" + (
        f" ({r.deleted:,} deleted)" if r.deleted else ""
    )
    held = f", {r.quarantined:,} quarantined" if r.quarantined else ""
    say(
        f"round {r.round} at {r.started_at:%H:%M:%S}: {r.rows:,} rows, {r.users:,} users brought, {deletes}"
        f"{held}, lag {lag} (run {r.run_id}{', resumed' if r.resumed else ''}, {r.seconds:.1f} s)",
        "red" if r.quarantined else None,
    )


def follow_end(end: FollowEnd) -> None:
    """How the follow stopped, and what the next command does."""
    if end.interrupted_round:
        say(
            f"Stopped during round {end.rounds}: its committed batches are kept; the next `sync run` "
            "resumes it (exit 130)."
        )
    else:
        say(f"Stopped after {end.rounds} round(s), between rounds: nothing is left half done.")


def _duration(every: timedelta) -> str:
    minutes, seconds = divmod(int(every.total_seconds()), 60)
    hours, minutes = divmod(minutes, 60)
    text = "".join(f"{n}{unit}" for n, unit in ((hours, "h"), (minutes, "m"), (seconds, "s")) if n)
    return text or "0s"


def deletes(report: DeletesReport) -> None:
    """Production deletes per table and for users; ``--deletes report`` changes nothing."""
    lines = report.lines()
    if not lines:
        say("production deletes: none")
        return
    changed = "" if report.mode == "report" else f" ({report.mode})"
    say(f"production deletes{changed}:", "yellow")
    for line in lines:
        say(f"  - {line}", "yellow")
    if report.mode == "report":
        say("  nothing was deleted: `--deletes apply` (or `soft` for users) removes them", "yellow")


def quarantine_retry(report: RunReport) -> None:
    """How many quarantined rows landed on a retry, and how many the target still refuses."""
    landed = sum(t.written for t in report.tables)
    say(
        f"{landed} quarantined row(s) landed; {report.quarantined} still refused.",
        "red" if report.quarantined else None,
    )


def status(report: StatusReport) -> None:
    """The runs recorded in the target, the last run's progress, and the quarantined rows."""
    if not report.initialised:
        say("No sync has run on this target yet.")
        return
    runs = Table(title="Runs")
    for column in ("run", "status", "since", "started", "finished"):
        runs.add_column(column, no_wrap=True)
    for r in report.runs:
        runs.add_row(
            str(r.id),
            r.shown_status,
            f"{r.since:%Y-%m-%d %H:%M:%S%z}" if r.since else "—",
            f"{r.started_at:%Y-%m-%d %H:%M:%S}",
            f"{r.finished_at:%Y-%m-%d %H:%M:%S}" if r.finished_at else "—",
        )
    console.print(runs)
    for r in report.runs:
        if r.reason and r.reason != PROCESS_GONE:
            say(f"run {r.id} {r.status}: {r.reason}", "red")
    if report.progress:
        progress = Table(title=f"Run {report.runs[0].id}: tables")
        for column in ("table", "rows done", "done"):
            progress.add_column(column)
        for p in report.progress:
            progress.add_row(p.table, f"{p.rows_done:,}", "yes" if p.done else "no")
        console.print(progress)
    say(f"Quarantined rows: {report.quarantined}", "red" if report.quarantined else None)
    for q in report.quarantine:
        say(f"  {q.table} {q.source_key}: {q.error}")


def verify(report: VerifyReport, shown: int = 20) -> None:
    """Per table (users first) the counts, then each problem with its first keys, then the verdict."""
    table = Table(title="Verify" + (f" (rows since {report.since.isoformat()})" if report.since else ""))
    for column in (
        "table",
        "in scope",
        "equal",
        "missing",
        "different",
        "prod. deleted",
        "quarantined",
        "orphans",
    ):
        table.add_column(column, justify="left" if column == "table" else "right", no_wrap=True)
    for c in report.checks:
        table.add_row(
            c.table,
            f"{c.in_scope:,}",
            f"{c.equal:,}",
            *(f"{n:,}" for n in (len(c.missing), len(c.different), len(c.production_deletes))),
            f"{len(c.quarantined):,}",
            f"{c.orphans:,}",
            style=None if c.ok else "red",
        )
    console.print(table)
    for c in report.checks:
        groups = {
            "missing on the target": c.missing,
            "different": [f"{d.key} ({', '.join(d.columns)})" for d in c.different],
            "only on the target, deleted in production": c.production_deletes,
            "quarantined, not landed": c.quarantined,
        }
        for problem, keys in groups.items():
            if keys:
                more = f" … and {len(keys) - shown:,} more (--json lists all)" if len(keys) > shown else ""
                say(f"{c.table}: {len(keys):,} {problem}: {', '.join(keys[:shown])}{more}", "red")
        if c.orphans:
            say(f"{c.table}: {c.orphans:,} row(s) point at a parent the target lacks", "red")
    if report.sign_ins is not None:
        say(report.sign_ins.line(), None if report.sign_ins.ok else "red")
        if report.sign_ins.cannot:
            more = len(report.sign_ins.cannot) - shown
            say(
                f"  cannot sign in on the target: {', '.join(report.sign_ins.cannot[:shown])}"
                + (f" … and {more:,} more (--json lists all)" if more > 0 else ""),
                "red",
            )
    if report.files is not None:
        say(report.files.line(), None if report.files.ok else "red")
        for example in report.files.examples:
            say(f"  {example}")
    say(
        "verified: everything in scope is equal" if report.ok else "verification found differences (exit 4)",
        None if report.ok else "red",
    )


def sign_in(answer: SignIn) -> None:
    """``sync verify --check-password``: yes or no, with the reason, in one line (never the password)."""
    if answer.signs_in:
        say(f"yes: {answer.email} would sign in on the target: {answer.reason}.")
    elif answer.checked:
        say(f"no: {answer.email} would not sign in on the target: {answer.reason}.", "red")
    else:
        say(f"unknown: {answer.email}: {answer.reason}.", "yellow")


def cutover(report: CutoverReport) -> None:
    """The success metrics as measured, then the verdict."""
    table = Table(title="Cutover: success metrics")
    for column in ("metric", "measured", "goal", "met"):
        table.add_column(column, no_wrap=column != "goal")
    for m in report.metrics:
        table.add_row(m.name, m.measured, m.goal, "yes" if m.met else "NO", style=None if m.met else "red")
    console.print(table)
    if report.ok:
        say(f"cutover verified: every metric met; downtime {report.downtime_seconds:.1f} s")
    else:
        say(f"cutover NOT verified (exit 4): {', '.join(report.unmet())} not met", "red")
