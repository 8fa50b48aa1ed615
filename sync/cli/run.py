"""``sync run`` (once, or ``--follow``) and ``sync quarantine retry``.

:mod:`sync.render` (and rich with it) is imported where something is printed for people, so a run with
``--json`` or ``--quiet`` starts without it.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Awaitable
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import click

from sync.auth import AuthOptions, AuthReport
from sync.cli.common import (
    Instant,
    admin_api_of,
    deletes_option,
    fail,
    mapping_of,
    mapping_option,
    parse_endpoints,
    project_options,
    run_pipeline,
    source_option,
    storage_stage,
    target_option,
)
from sync.connect import Endpoint
from sync.errors import SyncError
from sync.modes import DeleteMode
from sync.progress import RunProgress
from sync.run import RunOptions, RunReport, admin_api_checks, auth_import, run_auth_only, run_sync
from sync.state import CATCH_UP_OVERLAP

if TYPE_CHECKING:
    from rich.console import Console

    from sync.follow import FollowRound, RunRound


@click.command("run")
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
    default=int(CATCH_UP_OVERLAP.total_seconds()),
    show_default=True,
    metavar="SECONDS",
    help="Catch-up runs re-read this much before the last run's high-water mark.",
)
@deletes_option
@click.option("--auth-only", is_flag=True, help="Run only the auth import; copy no table rows.")
@click.option("--skip-auth", is_flag=True, help="Copy table rows only (the users were imported already).")
@click.option(
    "--auth-mode",
    type=click.Choice(["direct", "admin-api"]),
    help="direct: INSERT into auth.users/auth.identities. admin-api: create users through the Auth "
    "admin API with the service-role key; what the API cannot carry is written through --target. "
    "Default: the mapping's [sync] auth.",
)
@project_options
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
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    help="Tables, key ranges of a large table, groups of new auth users: copied at once (default: mapping).",
)
@click.option(
    "--follow",
    is_flag=True,
    help="Repeat catch-up runs until Ctrl-C, one line per round (rows and users brought, production "
    "deletes, lag). With --since, the first round takes the window. Ctrl-C between rounds: exit 0 (3 "
    "when the last round quarantined rows); during a round: exit 130, the round resumes on the next run.",
)
@click.option(
    "--every",
    metavar="DURATION",
    help="With --follow: start a round this often, e.g. 30s, 2m, 1m30s [default: 30s].",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout (one line a round)."
)
@click.option("--quiet", is_flag=True, help="Print nothing but errors; the exit code tells the outcome.")
def run_command(
    source: str | None,
    target: str | None,
    mapping_path: Path | None,
    since: datetime | None,
    restart: bool,
    overlap: int,
    deletes: str,
    auth_only: bool,
    skip_auth: bool,
    auth_mode: str | None,
    supabase_url: str | None,
    service_role_key: str | None,
    source_supabase_url: str | None,
    source_service_role_key: str | None,
    storage_concurrency: int | None,
    auth_concurrency: int,
    batch_size: int | None,
    jobs: int | None,
    follow: bool,
    every: str | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Bring production's users and rows onto the target: auth users first, then tables in FK order.

    Resumable: after a crash or Ctrl-C, run the same command again. Exit 0: everything landed;
    3: some rows quarantined (see `sync status --show`); 1: failed; 2: usage, mapping or plan error;
    130: Ctrl-C cut a --follow round short.
    """
    interval = _follow_interval(follow, every, auth_only)
    endpoints = parse_endpoints(source, target)
    mapping = mapping_of(mapping_path)
    mode = auth_mode or mapping.sync.auth
    admin_api = admin_api_of(mode, supabase_url, service_role_key)
    auth_options = AuthOptions(
        mode=mode,
        triggers=mapping.sync.triggers,
        concurrency=auth_concurrency,
        jobs=jobs or mapping.sync.jobs,
    )
    logging.basicConfig(
        level=logging.WARNING if quiet or as_json else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
        force=True,
    )
    progress = RunProgress(None if quiet or as_json or interval else _console(), {})
    if auth_only:

        async def auth_work() -> AuthReport:
            with progress.shown():
                return await run_auth_only(*endpoints, auth_options, admin_api, progress)

        report = run_pipeline(*endpoints, auth_work)
        if as_json:
            click.echo(report.model_dump_json(indent=2))
        elif not quiet:
            from sync import render  # here: see the module's docstring

            render.auth(report)
        sys.exit(report.exit_code)

    options = RunOptions(
        since=since,
        restart=restart,
        overlap=timedelta(seconds=overlap),
        batch_size=batch_size,
        jobs=jobs,
        skip_auth=skip_auth,
        deletes=DeleteMode(deletes),
    )

    access = (source_supabase_url, source_service_role_key, supabase_url, service_role_key)
    storage = storage_stage(mapping, access, storage_concurrency, progress)

    def run_round(round_options: RunOptions) -> Awaitable[RunReport]:
        return run_sync(
            *endpoints,
            mapping,
            round_options,
            auth_stage=auth_import(auth_options, admin_api, progress),
            progress=progress,
            checks=[] if skip_auth else admin_api_checks(auth_options, admin_api),
            storage_stage=storage,
        )

    if interval is not None:
        _follow(endpoints, run_round, options, interval, as_json=as_json, quiet=quiet)

    async def work() -> RunReport:
        with progress.shown():
            return await run_round(options)

    report = run_pipeline(*endpoints, work)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    elif not quiet:
        from sync import render  # here: see the module's docstring

        render.run(report)
    sys.exit(report.exit_code)


def _console() -> Console:
    """The console people read a run's progress on."""
    from sync import render

    return render.console


def _follow_interval(follow: bool, every: str | None, auth_only: bool) -> timedelta | None:
    """The round interval of ``--follow`` (None without it); bad combinations and values exit 2."""
    if not follow:
        if every is not None:
            fail("--every sets the interval of --follow: add --follow, or leave --every out.")
        return None
    if auth_only:
        fail("--follow repeats whole catch-up runs: it does not combine with --auth-only.")
    from sync.follow import DEFAULT_EVERY, parse_every  # here: a single run never loads the rounds' loop

    try:
        return parse_every(every) if every is not None else DEFAULT_EVERY
    except SyncError as exc:
        fail(str(exc), exc.exit_code)


def _follow(
    endpoints: tuple[Endpoint, Endpoint],
    run_round: RunRound,
    options: RunOptions,
    every: timedelta,
    *,
    as_json: bool,
    quiet: bool,
) -> NoReturn:
    """``sync run --follow``: rounds until Ctrl-C, one line each; exits with the follow's code."""
    from sync import render
    from sync.follow import follow  # here: a single run never loads the rounds' loop

    if not (quiet or as_json):
        render.follow_start(every)

    def on_round(round_: FollowRound) -> None:
        if as_json:
            click.echo(round_.model_dump_json())
        elif not quiet:
            render.follow_round(round_)
        logging.getLogger().setLevel(logging.WARNING)  # the sides and notes were named by the first round

    end = run_pipeline(*endpoints, lambda: follow(run_round, options, every, on_round))
    if not (quiet or as_json):
        render.follow_end(end)
    sys.exit(end.exit_code)


@click.group("quarantine")
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
    from sync import render

    endpoints = parse_endpoints(source, target)
    mapping = mapping_of(mapping_path)
    auth_options = AuthOptions(mode="direct", triggers=mapping.sync.triggers)
    report = run_pipeline(
        *endpoints,
        lambda: run_sync(
            *endpoints, mapping, RunOptions(retry_quarantine=True), auth_stage=auth_import(auth_options)
        ),
    )
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        render.quarantine_retry(report)
    sys.exit(report.exit_code)
