"""The ``sync`` command line: parses options, calls the engine, prints results. Nothing else."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NoReturn, TypeVar

import asyncpg
import click
from pydantic import SecretStr
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from sync import scenario
from sync.auth import AdminApi, AuthOptions, import_users
from sync.connect import Endpoint, Side
from sync.embedded import EmbeddedError
from sync.errors import EXIT_FAILED, SyncError
from sync.mapping import Mapping, load_mapping
from sync.plan import PlanReport
from sync.preview import preview
from sync.progress import RunProgress
from sync.run import RunOptions, RunReport, auth_import, run_sync
from sync.status import read_status
from sync.verify import VerifyReport

T = TypeVar("T")

EXIT_USAGE = 2

# Pipes and CI logs get wide lines rather than tables cut to 80 columns.
console = Console(width=None if sys.stdout.isatty() else 140)
errors = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print one clear line on stderr and exit with ``code``."""
    # Escaped: messages quote mapping lines such as [tables."public.x"], which are not markup.
    errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(code)


def source_option(help_text: str) -> Callable[[Callable[..., object]], Callable[..., object]]:
    """``--source DSN`` (env ``SYNC_SOURCE_URL``), with the command's own help text."""
    return click.option("--source", envvar="SYNC_SOURCE_URL", metavar="DSN", help=help_text)


def target_option(help_text: str) -> Callable[[Callable[..., object]], Callable[..., object]]:
    """``--target DSN`` (env ``SYNC_TARGET_URL``), with the command's own help text."""
    return click.option("--target", envvar="SYNC_TARGET_URL", metavar="DSN", help=help_text)


def mapping_option(help_text: str) -> Callable[[Callable[..., object]], Callable[..., object]]:
    """``--mapping FILE``."""
    return click.option(
        "--mapping", "mapping_path", type=click.Path(path_type=Path), metavar="FILE", help=help_text
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="supabase-sync")
def main() -> None:
    """Bring the users and rows a Supabase production database gained into a target whose schema moved on."""


@main.command()
@source_option("Build production here instead of on the embedded server [env SYNC_SOURCE_URL].")
@target_option("Build development here instead of on the embedded server [env SYNC_TARGET_URL].")
@click.option(
    "--scale",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Multiply the seed's counts (100 is about 400k users).",
)
@click.option(
    "--seed",
    type=int,
    default=scenario.DEFAULT_SEED,
    show_default=True,
    help="Seed of the generator: the same seed builds the same rows.",
)
@click.option("--no-sync", is_flag=True, help="Only build the scenario; do not run the sync on it.")
def demo(source: str | None, target: str | None, scale: int, seed: int, no_sync: bool) -> None:
    """Build the seed scenario (production and development), sync it, and verify the result.

    With --no-sync, only build it and show both sides' counts.
    """
    from sync import demo as demo_mod

    if (source is None) != (target is None):
        fail("give both --source and --target, or neither (the embedded server is used then).")
    try:
        if source and target:
            built = demo_mod.build(source, target, scale, seed)
        else:
            with console.status("Starting PostgreSQL and building the scenario…"):
                built = demo_mod.build_on_embedded(scale, seed)
    except (demo_mod.DemoError, EmbeddedError) as exc:
        fail(str(exc), code=1)
    console.print(f"Scenario built in {built.seconds:.1f} s (scale {scale}, seed {seed}).")
    _print_counts(scenario.table_counts(built.source_url), scenario.table_counts(built.target_url))
    console.print(f"production:  {_safe(built.source_url)}\ndevelopment: {_safe(built.target_url)}")
    if no_sync:
        return
    endpoints = Endpoint.parse(Side.SOURCE, built.source_url), Endpoint.parse(Side.TARGET, built.target_url)
    console.print(f"\n$ sync run --since {scenario.COPY_DATE:%Y-%m-%d}")
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    report = _run_pipeline(
        *endpoints,
        lambda: run_sync(
            *endpoints,
            load_mapping(demo_mod.SCENARIO_MAPPING),
            RunOptions(since=scenario.COPY_DATE),
            auth_stage=auth_import(AuthOptions()),
        ),
    )
    _print_run(report)
    _print_counts(scenario.table_counts(built.source_url), scenario.table_counts(built.target_url))
    checked, verified = demo_mod.verify_logins(built.target_url, sample=25)
    _say(
        f"Password check: {verified} of {checked} sampled production users (5 at bcrypt cost 10) verify "
        "their production password against the target's hash.",
        None if verified == checked else "red",
    )
    console.print("\n$ sync verify")
    mapping = load_mapping(demo_mod.SCENARIO_MAPPING)
    checks = _run_pipeline(*endpoints, lambda: _verify(endpoints, mapping, None))
    _print_verify(checks)
    sys.exit(report.exit_code or (0 if checks.ok and verified == checked else EXIT_FAILED))


class Instant(click.ParamType):
    """A date (midnight UTC) or an ISO 8601 timestamp (UTC unless it names its offset)."""

    name = "date"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            parsed = datetime.fromisoformat(str(value).strip())
        except ValueError:
            self.fail(
                f"{value!r} is not a date (2024-11-18) or an ISO 8601 instant (2024-11-18T09:30:00-06:00)"
            )
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@main.command("plan")
@source_option(
    "The production database, only ever read: a postgresql:// URL or key=value string; "
    "PG* variables fill what it leaves out [env SYNC_SOURCE_URL]."
)
@target_option("The development database the rows go to; `sync plan` only reads it [env SYNC_TARGET_URL].")
@click.option(
    "--mapping",
    "mapping_path",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="Mapping file (TOML) [default: mappings/sync.toml when present, else built-in defaults].",
)
@click.option(
    "--since",
    type=Instant(),
    metavar="DATE",
    help="Start of the window: rows whose since-column is at or after it. A date means midnight UTC; "
    "an ISO 8601 instant may carry its offset. Without it, whole tables are counted.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON (the PlanReport model).")
def plan_command(
    source: str | None, target: str | None, mapping_path: Path | None, since: datetime | None, as_json: bool
) -> None:
    """Show what a run would copy, in which order, and everything that would lose data. Writes nothing."""
    try:
        mapping = load_mapping(mapping_path)
        endpoints = Endpoint.parse(Side.SOURCE, source), Endpoint.parse(Side.TARGET, target)
        report = asyncio.run(preview(*endpoints, mapping, since))
    except SyncError as exc:
        fail(str(exc), exc.exit_code)
    if as_json:
        click.echo(report.model_dump_json(indent=2))
    else:
        _print_plan(report)
    if report.errors:
        fail(f"the plan has {len(report.errors)} problem(s) that would lose data; nothing was written.")


def _say(text: str = "", style: str | None = None) -> None:
    console.print(Text(text, style=style or ""), soft_wrap=True)


def _print_plan(report: PlanReport) -> None:
    _say(f"source: {report.source} (PostgreSQL {_version(report.source_version)})")
    _say(f"target: {report.target} (PostgreSQL {_version(report.target_version)})")
    _say(f"mapping: {report.mapping}")
    if report.since is None:
        _say("window: whole tables (no --since)")
    else:
        _say(f"window: rows whose since-column is at or after {report.since.isoformat()}")
    if report.tables:
        _say()
        _say("tables, parents first")
        rows = [
            (
                f"{number}.",
                t.name,
                t.key + (f" on {', '.join(t.match_on or t.natural)}" if t.match_on or t.natural else ""),
                "whole table"
                if t.since is None
                else f"since {t.since}" + ("" if t.since_indexed else " (no index)"),
                _rows_in_window(t.window_rows, t.collisions),
            )
            for number, t in enumerate(report.tables, start=1)
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        for row in rows:
            _say(
                "  "
                + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
                + "  "
                + row[4]
            )
    if report.users:
        u = report.users
        _say()
        _say(
            f"users: {u.source:,} in source, {u.target:,} in target: {u.to_create:,} to create, "
            f"{u.matched_by_id:,} matched by id, {u.matched_by_email:,} by e-mail (remapped), "
            f"{u.matched_by_phone:,} by phone (auth: {report.auth_mode})"
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
    _section("drift and new columns", report.notes)
    _section("warnings", report.warnings, "yellow")
    _section("errors (nothing can run until they are fixed)", report.errors, "bold red")


def _rows_in_window(rows: int | None, collisions: int | None) -> str:
    if rows is None:
        return ""
    text = f"{rows:,} rows in the window"
    if collisions:
        text += f", {collisions:,} of their keys taken by other rows in target"
    return text


def _section(title: str, lines: list[str], style: str | None = None) -> None:
    if lines:
        _say()
        _say(title, style)
        for line in lines:
            _say(f"  - {line}", style)


def _version(number: int) -> str:
    return f"{number // 10000}.{number % 10000}"


def _print_counts(production: dict[str, int], development: dict[str, int]) -> None:
    table = Table(title="Seed scenario")
    table.add_column("table")
    table.add_column("production (source)", justify="right")
    table.add_column("development (target)", justify="right")
    for name in dict.fromkeys([*production, *development]):
        table.add_row(name, _count(production.get(name)), _count(development.get(name)))
    console.print(table)


def _count(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


def _safe(url: str) -> str:
    from sync.embedded import redact_url

    return redact_url(url)


# ------------------------------------------------------------------------------------------------ run


def _endpoints(source: str | None, target: str | None) -> tuple[Endpoint, Endpoint]:
    try:
        return Endpoint.parse(Side.SOURCE, source), Endpoint.parse(Side.TARGET, target)
    except SyncError as exc:
        fail(str(exc), exc.exit_code)


def _admin_api(auth_mode: str, supabase_url: str | None, service_role_key: str | None) -> AdminApi | None:
    if auth_mode != "admin-api":
        return None
    if not supabase_url or not service_role_key:
        fail(
            "--auth-mode admin-api needs --supabase-url and --service-role-key "
            "(or SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY)."
        )
    return AdminApi(url=supabase_url, service_role_key=SecretStr(service_role_key))


def _run_pipeline(source: Endpoint, target: Endpoint, work: Callable[[], Awaitable[T]]) -> T:
    """Run ``work``; user errors and database failures become one line and an exit code."""
    try:
        return asyncio.run(work())
    except SyncError as exc:
        fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        fail("interrupted: every committed batch is kept; run the same command again to resume.", EXIT_FAILED)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, ExceptionGroup) as exc:
        inner = exc.exceptions[0] if isinstance(exc, ExceptionGroup) else exc
        message = target.redact(source.redact(str(inner).strip() or type(inner).__name__))
        fail(
            f"the run failed: {message}; rerun the same command to resume from the checkpoints.", EXIT_FAILED
        )


@main.command("run")
@source_option("The production database, only ever read [env SYNC_SOURCE_URL].")
@target_option("The development database the users and rows go to [env SYNC_TARGET_URL].")
@mapping_option("Mapping file (default: mappings/sync.toml when present, else built-in defaults).")
@click.option(
    "--since",
    type=Instant(),
    metavar="DATE",
    help="Copy rows changed at or after this instant (a bare date is midnight UTC). Without it: "
    "catch up from the last successful run's high-water mark.",
)
@click.option("--restart", is_flag=True, help="Start over instead of resuming an unfinished run.")
@click.option(
    "--overlap",
    type=click.IntRange(min=0),
    default=600,
    show_default=True,
    metavar="SECONDS",
    help="Catch-up runs re-read this much before the last run's high-water mark.",
)
@click.option("--auth-only", is_flag=True, help="Run only the auth import; copy no table rows.")
@click.option("--skip-auth", is_flag=True, help="Copy table rows only (the users were imported already).")
@click.option(
    "--auth-mode",
    type=click.Choice(["direct", "admin-api"]),
    help="direct: INSERT into auth.users/auth.identities. admin-api: create users through the Auth "
    "admin API with the service-role key; what the API cannot carry is written through --target. "
    "Default: the mapping's [sync] auth.",
)
@click.option(
    "--supabase-url",
    envvar="SUPABASE_URL",
    metavar="URL",
    help="The target project's URL, for --auth-mode admin-api [env SUPABASE_URL].",
)
@click.option(
    "--service-role-key",
    envvar="SUPABASE_SERVICE_ROLE_KEY",
    metavar="KEY",
    help="The target project's service-role key, for admin-api; never printed "
    "[env SUPABASE_SERVICE_ROLE_KEY].",
)
@click.option(
    "--auth-concurrency",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="admin-api: requests in flight at once.",
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), help="Rows per target transaction (default: mapping)."
)
@click.option("--jobs", type=click.IntRange(min=1), help="Tables copied in parallel (default: mapping).")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@click.option("--quiet", is_flag=True, help="Print nothing but errors; the exit code tells the outcome.")
def run_command(
    source: str | None,
    target: str | None,
    mapping_path: Path | None,
    since: datetime | None,
    restart: bool,
    overlap: int,
    auth_only: bool,
    skip_auth: bool,
    auth_mode: str | None,
    supabase_url: str | None,
    service_role_key: str | None,
    auth_concurrency: int,
    batch_size: int | None,
    jobs: int | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Bring production's users and rows onto the target: auth users first, then tables in FK order.

    Resumable: after a crash or Ctrl-C, run the same command again. Exit 0: everything landed;
    3: some rows quarantined (see `sync status --show`); 1: failed; 2: usage, mapping or plan error.
    """
    endpoints = _endpoints(source, target)
    try:
        mapping = load_mapping(mapping_path)
    except SyncError as exc:
        fail(str(exc), exc.exit_code)
    mode = auth_mode or mapping.sync.auth
    admin_api = _admin_api(mode, supabase_url, service_role_key)
    auth_options = AuthOptions(mode=mode, triggers=mapping.sync.triggers, concurrency=auth_concurrency)
    logging.basicConfig(
        level=logging.WARNING if quiet or as_json else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    if auth_only:
        report = _run_pipeline(
            *endpoints, lambda: import_users(*endpoints, auth_options, admin_api=admin_api)
        )
        if as_json:
            click.echo(report.model_dump_json(indent=2))
        elif not quiet:
            for line in report.summary():
                _say(line, "red" if line.startswith("Quarantined") else None)
        sys.exit(report.exit_code)

    progress = RunProgress(console, {}, enabled=not quiet and not as_json)
    options = RunOptions(
        since=since,
        restart=restart,
        overlap=timedelta(seconds=overlap),
        batch_size=batch_size,
        jobs=jobs,
        skip_auth=skip_auth,
    )

    async def work() -> RunReport:
        with progress.shown():
            return await run_sync(
                *endpoints,
                mapping,
                options,
                auth_stage=auth_import(auth_options, admin_api),
                progress=progress,
            )

    report = _run_pipeline(*endpoints, work)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    elif not quiet:
        _print_run(report)
    sys.exit(report.exit_code)


def _print_run(report: RunReport) -> None:
    since = report.since.isoformat() if report.since else "the beginning (whole tables)"
    _say(f"Run {report.run_id}{' (resumed)' if report.resumed else ''}: rows changed since {since}")
    if report.auth is not None:
        for line in report.auth.summary(shown=10):
            _say(line, "red" if line.startswith("Quarantined") else None)
    table = Table(title="Tables")
    for column in ("table", "read", "inserted", "updated", "remapped", "quarantined", "rows/s"):
        table.add_column(column, justify="left" if column == "table" else "right", no_wrap=True)
    for t in report.tables:
        rate = f"{t.read / t.seconds:,.0f}" if t.seconds > 0 else "—"
        table.add_row(
            t.table,
            f"{t.read:,}",
            f"{t.inserted:,}",
            f"{t.updated:,}",
            f"{t.remapped:,}",
            f"{t.quarantined:,}",
            rate,
        )
    console.print(table)
    _say(f"Sequences moved forward: {report.sequences_moved}. Done in {report.seconds:.1f} s.")
    if report.quarantined:
        _say(
            f"{report.quarantined} row(s) quarantined: `sync status --show` lists them; "
            "after fixing the cause, `sync quarantine retry`.",
            "red",
        )


@main.command("status")
@target_option("The database the runs wrote to [env SYNC_TARGET_URL].")
@click.option("--show", is_flag=True, help="List the quarantined rows with the database's message.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON (the StatusReport model).")
def status_command(target: str | None, show: bool, as_json: bool) -> None:
    """The runs recorded in the target, the progress of the last one, and quarantined rows."""
    try:
        endpoint = Endpoint.parse(Side.TARGET, target)
        report = asyncio.run(read_status(endpoint, show_quarantine=show))
    except SyncError as exc:
        fail(str(exc), exc.exit_code)
    if as_json:
        click.echo(report.model_dump_json(indent=2))
        return
    if not report.initialised:
        _say("No sync has run on this target yet.")
        return
    runs = Table(title="Runs")
    for column in ("run", "status", "since", "started", "finished"):
        runs.add_column(column)
    for r in report.runs:
        runs.add_row(
            str(r.id),
            r.status,
            f"{r.since:%Y-%m-%d %H:%M:%S%z}" if r.since else "—",
            f"{r.started_at:%Y-%m-%d %H:%M:%S}",
            f"{r.finished_at:%Y-%m-%d %H:%M:%S}" if r.finished_at else "—",
        )
    console.print(runs)
    if report.progress:
        progress = Table(title=f"Run {report.runs[0].id}: tables")
        for column in ("table", "rows done", "done"):
            progress.add_column(column)
        for p in report.progress:
            progress.add_row(p.table, f"{p.rows_done:,}", "yes" if p.done else "no")
        console.print(progress)
    _say(f"Quarantined rows: {report.quarantined}", "red" if report.quarantined else None)
    for q in report.quarantine:
        _say(f"  {q.table} {q.source_key}: {q.error}")


@main.command("verify")
@source_option("The production database, only ever read [env SYNC_SOURCE_URL].")
@target_option("The target database, only read here [env SYNC_TARGET_URL].")
@mapping_option("Mapping file (default: mappings/sync.toml when present, else built-in defaults).")
@click.option(
    "--since",
    type=Instant(),
    metavar="DATE",
    help="Check the rows changed since this instant (default: whole tables).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON (the VerifyReport model).")
def verify_command(
    source: str | None, target: str | None, mapping_path: Path | None, since: datetime | None, as_json: bool
) -> None:
    """Check that every production row and user is on the target, and that every user can log in.

    Reads both databases, writes nothing. Exit 0 when every check passes, 1 otherwise.
    """
    endpoints = _endpoints(source, target)
    try:
        mapping = load_mapping(mapping_path)
    except SyncError as exc:
        fail(str(exc), exc.exit_code)

    report = _run_pipeline(*endpoints, lambda: _verify(endpoints, mapping, since))
    if as_json:
        click.echo(report.model_dump_json(indent=2))
    else:
        _print_verify(report)
    sys.exit(0 if report.ok else EXIT_FAILED)


async def _verify(
    endpoints: tuple[Endpoint, Endpoint], mapping: Mapping, since: datetime | None
) -> VerifyReport:
    from sync.run import load_plan
    from sync.verify import verify

    return await verify(*endpoints, await load_plan(*endpoints, mapping), since)


def _print_verify(report: VerifyReport) -> None:
    u = report.users
    _say(
        f"users: {u.source_users:,} in production; missing on target {u.missing}, other password hash "
        f"{u.other_hash}, not loadable by the Auth server {u.unloadable}, e-mail users without an e-mail "
        f"identity {u.without_email_identity}",
        None if not (u.missing or u.other_hash or u.unloadable) else "red",
    )
    for example in u.examples:
        _say(f"  {example}")
    for t in report.tables:
        examples = f" (e.g. {', '.join(t.missing_examples)})" if t.missing_examples else ""
        _say(
            f"{t.table}: {t.source_rows:,} production rows checked, missing {t.missing}, "
            f"orphans {t.orphans}{examples}",
            None if t.missing == 0 and t.orphans == 0 else "red",
        )
    _say(
        "verified: nothing missing" if report.ok else "verification found problems",
        None if report.ok else "red",
    )


@main.group("quarantine")
def quarantine_group() -> None:
    """Rows the target refused, kept in _sync.quarantine with the database's message."""


@quarantine_group.command("retry")
@source_option("The production database [env SYNC_SOURCE_URL].")
@target_option("The target database [env SYNC_TARGET_URL].")
@mapping_option("Mapping file (default: mappings/sync.toml when present).")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
def quarantine_retry(
    source: str | None, target: str | None, mapping_path: Path | None, as_json: bool
) -> None:
    """Re-read the quarantined rows from the source and try them again (after fixing the cause).

    Rows that land leave quarantine; the others stay with the new message. Exit 0 when none remain.
    """
    endpoints = _endpoints(source, target)
    try:
        mapping = load_mapping(mapping_path)
    except SyncError as exc:
        fail(str(exc), exc.exit_code)
    auth_options = AuthOptions(mode="direct", triggers=mapping.sync.triggers)
    report = _run_pipeline(
        *endpoints,
        lambda: run_sync(
            *endpoints, mapping, RunOptions(retry_quarantine=True), auth_stage=auth_import(auth_options)
        ),
    )
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        landed = sum(t.written for t in report.tables)
        _say(
            f"{landed} quarantined row(s) landed; {report.quarantined} still refused.",
            "red" if report.quarantined else None,
        )
    sys.exit(report.exit_code)
