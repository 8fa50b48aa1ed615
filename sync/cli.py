"""The ``sync`` command line: parses options, calls the engine, prints results. Nothing else."""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from sync import scenario
from sync.connect import Endpoint, Side
from sync.embedded import EmbeddedError
from sync.errors import SyncError
from sync.mapping import load_mapping
from sync.plan import PlanReport
from sync.preview import preview

EXIT_USAGE = 2

console = Console()
errors = Console(stderr=True)


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print one clear line on stderr and exit with ``code``."""
    # Escaped: messages quote mapping lines such as [tables."public.x"], which are not markup.
    errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="supabase-sync")
def main() -> None:
    """Bring the users and rows a Supabase production database gained into a target whose schema moved on."""


@main.command()
@click.option(
    "--source",
    envvar="SYNC_SOURCE_URL",
    metavar="DSN",
    help="Build production here instead of on the embedded server [env SYNC_SOURCE_URL].",
)
@click.option(
    "--target",
    envvar="SYNC_TARGET_URL",
    metavar="DSN",
    help="Build development here instead of on the embedded server [env SYNC_TARGET_URL].",
)
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
    """Build the seed scenario (production and development databases) and show both sides' counts."""
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
@click.option(
    "--source",
    envvar="SYNC_SOURCE_URL",
    metavar="DSN",
    help="The production database, only ever read: a postgresql:// URL or key=value string; "
    "PG* variables fill what it leaves out [env SYNC_SOURCE_URL].",
)
@click.option(
    "--target",
    envvar="SYNC_TARGET_URL",
    metavar="DSN",
    help="The development database the rows go to; `sync plan` only reads it [env SYNC_TARGET_URL].",
)
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


@main.command("run")
@click.option(
    "--source",
    envvar="SYNC_SOURCE_URL",
    metavar="DSN",
    help="The production database, only ever read [env SYNC_SOURCE_URL].",
)
@click.option(
    "--target",
    envvar="SYNC_TARGET_URL",
    metavar="DSN",
    help="The development database the users (and rows) go to [env SYNC_TARGET_URL].",
)
@click.option(
    "--auth-only",
    is_flag=True,
    help="Run only the auth import: every production user exists on the target and signs in with the "
    "same password. Table rows are not copied.",
)
@click.option(
    "--auth-mode",
    type=click.Choice(["direct", "admin-api"]),
    default="direct",
    show_default=True,
    help="direct: INSERT into auth.users/auth.identities (needs INSERT and UPDATE there). admin-api: "
    "create users through the Auth admin API with the service-role key; what the API cannot carry "
    "is then written through --target.",
)
@click.option(
    "--supabase-url",
    envvar="SUPABASE_URL",
    metavar="URL",
    help="The target project's URL (https://<ref>.supabase.co), for --auth-mode admin-api "
    "[env SUPABASE_URL].",
)
@click.option(
    "--service-role-key",
    envvar="SUPABASE_SERVICE_ROLE_KEY",
    metavar="KEY",
    help="The target project's service-role key, for --auth-mode admin-api; never printed "
    "[env SUPABASE_SERVICE_ROLE_KEY].",
)
@click.option(
    "--auth-concurrency",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="admin-api: requests in flight at once.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (the AuthReport model).")
@click.option("--quiet", is_flag=True, help="Print nothing but errors; the exit code tells the outcome.")
def run_command(
    source: str | None,
    target: str | None,
    auth_only: bool,
    auth_mode: str,
    supabase_url: str | None,
    service_role_key: str | None,
    auth_concurrency: int,
    as_json: bool,
    quiet: bool,
) -> None:
    """Bring production's users (and rows) onto the target.

    Exit 0: everything landed; 3: some users quarantined; 1: failed; 2: usage or privilege error.
    """
    import logging

    import asyncpg
    from pydantic import SecretStr

    from sync.auth import AdminApi, AuthOptions, import_users
    from sync.errors import EXIT_FAILED

    if not auth_only:
        fail("copying tables is not available in `sync run` yet: run the auth import with --auth-only.")
    if not quiet and not as_json:
        logging.basicConfig(level=logging.WARNING, format="%(message)s")  # retries say what they retry
    admin_api = None
    if auth_mode == "admin-api" and supabase_url and service_role_key:
        admin_api = AdminApi(url=supabase_url, service_role_key=SecretStr(service_role_key))
    try:
        endpoints = Endpoint.parse(Side.SOURCE, source), Endpoint.parse(Side.TARGET, target)
        options = AuthOptions(mode=auth_mode, concurrency=auth_concurrency)
        report = asyncio.run(import_users(*endpoints, options, admin_api=admin_api))
    except SyncError as exc:
        fail(str(exc), exc.exit_code)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        message = endpoints[1].redact(endpoints[0].redact(str(exc).strip() or type(exc).__name__))
        fail(f"the auth import failed: {message}; rerun to resume (it is idempotent).", EXIT_FAILED)
    if as_json:
        click.echo(report.model_dump_json(indent=2))
    elif not quiet:
        for line in report.summary():
            _say(line, "red" if line.startswith("Quarantined") else None)
    sys.exit(report.exit_code)
