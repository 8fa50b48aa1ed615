"""``sync cutover``: the final catch-up, verify and the success metrics."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from sync import render
from sync.auth import AuthOptions
from sync.cli.common import (
    admin_api_of,
    deletes_option,
    fail,
    mapping_option,
    parse_endpoints,
    project_options,
    run_pipeline,
    source_option,
    storage_stage,
    target_option,
)
from sync.cutover import CutoverReport, check_report_paths, cutover
from sync.cutover.markdown import to_markdown
from sync.errors import SyncError
from sync.mapping import load_mapping
from sync.modes import DeleteMode
from sync.progress import RunProgress
from sync.run import auth_import

MAINTENANCE_REFUSED = (
    "sync cutover needs production in maintenance mode (no writes until it ends): say so with --yes "
    "(there is no terminal to ask on); nothing was written."
)


@click.command("cutover")
@source_option("The production database, in maintenance mode; only ever read [env SYNC_SOURCE_URL].")
@target_option("The database production's users and rows go to [env SYNC_TARGET_URL].")
@mapping_option("Mapping file (default: mappings/sync.toml when present, else built-in defaults).")
@click.option(
    "--yes", is_flag=True, help="Production is in maintenance mode: cut over without asking on the terminal."
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="Write the report as JSON to FILE (the CutoverReport model) and as Markdown beside it, FILE "
    "with its suffix replaced by .md (cutover.json → cutover.md).",
)
@deletes_option
@project_options
def cutover_command(
    source: str | None,
    target: str | None,
    mapping_path: Path | None,
    yes: bool,
    report_path: Path | None,
    deletes: str,
    supabase_url: str | None,
    service_role_key: str | None,
    source_supabase_url: str | None,
    source_service_role_key: str | None,
    storage_concurrency: int | None,
) -> None:
    """The final catch-up, verify, and the success metrics, with the downtime this command took.

    Production must be in maintenance mode. Runs the catch-up `sync run` would (files too, with both
    projects' URLs and keys), then verifies everything production holds, then prints, as measured:
    users who can sign in on the target (of those who can on production), rows lost, quarantined,
    files, and the downtime. Exit 0 only when every metric is met; 4 when one is not (named); 1 or 2
    as `sync run` when the catch-up fails or is refused.
    """
    endpoints = parse_endpoints(source, target)
    try:
        mapping = load_mapping(mapping_path)
        paths = check_report_paths(report_path) if report_path else None
    except SyncError as exc:
        fail(str(exc), exc.exit_code)
    if not yes:
        if not sys.stdin.isatty():
            fail(MAINTENANCE_REFUSED)
        if not click.confirm("Is production in maintenance mode (no writes until the cutover ends)?"):
            fail("cutover not started: put production in maintenance mode first; nothing was written.")
    mode = mapping.sync.auth
    admin_api = admin_api_of(mode, supabase_url, service_role_key)
    auth_options = AuthOptions(mode=mode, triggers=mapping.sync.triggers)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
    progress = RunProgress(render.console, {})
    access = (source_supabase_url, source_service_role_key, supabase_url, service_role_key)
    storage = storage_stage(mapping, access, storage_concurrency, progress)

    async def work() -> CutoverReport:
        with progress.shown():
            return await cutover(
                *endpoints,
                mapping,
                deletes=DeleteMode(deletes),
                auth_stage=auth_import(auth_options, admin_api, progress),
                storage_stage=storage,
                progress=progress,
                caught_up=render.run,
            )

    report = run_pipeline(*endpoints, work)
    render.verify(report.verify)
    render.cutover(report)
    if paths:
        paths[0].write_text(report.model_dump_json(indent=2) + "\n")
        paths[1].write_text(to_markdown(report))
        render.say(f"report: {paths[0]} and {paths[1]}")
    sys.exit(report.exit_code)
