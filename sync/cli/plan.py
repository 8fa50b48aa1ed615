"""``sync plan``: what a run would do, read from both databases; writes nothing."""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path

import click

from sync import render
from sync.cli.common import (
    Instant,
    fail,
    source_option,
    target_option,
)
from sync.connect import Endpoint, Side
from sync.errors import SyncError
from sync.mapping import load_mapping
from sync.preview import preview


@click.command("plan")
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
    "an ISO 8601 instant may carry its offset. Without it, the plan is the catch-up `sync run` would "
    "do: from the last successful run's mark, or whole tables before the first run.",
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
        render.plan(report)
    if report.errors:
        fail(f"the plan has {len(report.errors)} problem(s) that would lose data; nothing was written.")
