"""The ``sync`` command line: parses options, calls the engine, prints results. Nothing else.

Longer than ~400 lines only because every command's options, with their help text and environment
variables, are declared here; it holds no logic of its own (printing is in :mod:`sync.render`).
"""

from __future__ import annotations

import asyncio
import getpass
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

from sync import render
from sync.auth import AdminApi, AuthOptions, AuthReport
from sync.auth.columns import DEFAULT_AUD
from sync.connect import Endpoint, Side, redact
from sync.cutover import CutoverReport, check_report_paths, cutover
from sync.cutover.markdown import to_markdown
from sync.errors import EXIT_FAILED, EXIT_USAGE, SyncError, cause_of, first_cause, first_line
from sync.follow import DEFAULT_EVERY, FollowRound, RunRound, follow, parse_every
from sync.mapping import Mapping, load_mapping
from sync.modes import DeleteMode
from sync.preview import preview
from sync.progress import RunProgress
from sync.resources import example_mapping
from sync.run import RunOptions, RunReport, admin_api_checks, auth_import, run_auth_only, run_sync
from sync.state import CATCH_UP_OVERLAP
from sync.status import read_status
from sync.storage.stage import StorageAccess, StorageStage
from sync.storage.transfer import TransferSettings
from sync.verify import VerifyReport
from sync.verify.sides import verify_sides
from sync.verify.signin import check_sign_in

T = TypeVar("T")

DEVKIT_MISSING = (
    "sync demo needs the development kit (devkit/), which is not part of the installed package: "
    "run it from a clone of the project (`make demo`)."
)


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print one clear line on stderr and exit with ``code``."""
    render.error(message)
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


def project_options(command: Callable[..., object]) -> Callable[..., object]:
    """Both projects' URLs and service-role keys (files; the target's for admin-api too), and how many
    files move at once."""
    options = [
        click.option(
            "--supabase-url",
            envvar="SUPABASE_URL",
            metavar="URL",
            help="The target project's URL, for --auth-mode admin-api and for files [env SUPABASE_URL].",
        ),
        click.option(
            "--service-role-key",
            envvar="SUPABASE_SERVICE_ROLE_KEY",
            metavar="KEY",
            help="The target project's service-role key, for admin-api and files; never printed "
            "[env SUPABASE_SERVICE_ROLE_KEY].",
        ),
        click.option(
            "--source-supabase-url",
            envvar="SYNC_SOURCE_SUPABASE_URL",
            metavar="URL",
            help="The production project's URL: files the mapping names are read through its Storage API "
            "[env SYNC_SOURCE_SUPABASE_URL].",
        ),
        click.option(
            "--source-service-role-key",
            envvar="SYNC_SOURCE_SERVICE_ROLE_KEY",
            metavar="KEY",
            help="The production project's service-role key, for files; never printed "
            "[env SYNC_SOURCE_SERVICE_ROLE_KEY].",
        ),
        click.option(
            "--storage-concurrency",
            envvar="SYNC_STORAGE_CONCURRENCY",
            type=click.IntRange(min=1),
            help="Files transferred at once (default: the mapping's [storage] concurrency, 4) "
            "[env SYNC_STORAGE_CONCURRENCY].",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def deletes_option(command: Callable[..., object]) -> Callable[..., object]:
    """``--deletes report|apply|soft``: what to do with rows and users production deleted."""
    return click.option(
        "--deletes",
        type=click.Choice([m.value for m in DeleteMode]),
        default=DeleteMode.REPORT.value,
        show_default=True,
        help="Rows and users production deleted after they reached the target: report them only, apply "
        "(delete them on the target; never a development row), or soft (as apply, but users are banned "
        "and marked deleted as the Auth server's soft delete does).",
    )(command)


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
    help="Seed of the generator: the same seed builds the same rows [default: the scenario's own].",
)
@click.option("--no-sync", is_flag=True, help="Only build the scenario; do not run the sync on it.")
@click.option(
    "--no-files", is_flag=True, help="Leave the files out (no local Storage APIs): users and rows only."
)
def demo(
    source: str | None, target: str | None, scale: int, seed: int | None, no_sync: bool, no_files: bool
) -> None:
    """Build the seed scenario (production and development) and tell the whole story on it.

    sync plan, sync run --since 2024-11-18, production changes, a catch-up, sync cutover and its success
    metrics, files through two local Storage APIs. With --no-sync, only build it and show the counts.
    """
    try:  # The development kit lives in a checkout of the project, not in the installed package.
        from devkit import demo as kit
        from devkit import scenario
        from devkit.embedded import EmbeddedError
    except ModuleNotFoundError as exc:
        if exc.name != "devkit" and not (exc.name or "").startswith("devkit."):
            raise
        fail(DEVKIT_MISSING)

    if (source is None) != (target is None):
        fail("give both --source and --target, or neither (the embedded server is used then).")
    seed = scenario.DEFAULT_SEED if seed is None else seed
    try:
        if source and target:
            built = kit.build(source, target, scale, seed)
        else:
            with render.console.status("Starting PostgreSQL and building the scenario…"):
                built = kit.build_on_embedded(scale, seed)
    except (kit.DemoError, EmbeddedError) as exc:
        fail(str(exc), code=EXIT_FAILED)
    render.say(f"Scenario built in {built.seconds:.1f} s (scale {scale}, seed {seed}).")
    render.counts(scenario.table_counts(built.source_url), scenario.table_counts(built.target_url))
    for side in built.shaped:
        render.say(
            f"The {side} database had no auth schema: Supabase's auth and storage schemas were created."
        )
    if no_sync:
        _demo_reach(built.source_url, built.target_url, own=source is None, since=scenario.COPY_DATE)
        render.say(
            f"Next: sync plan --since {scenario.COPY_DATE:%Y-%m-%d}, then sync run with the same --since."
        )
        return
    endpoints = Endpoint.parse(Side.SOURCE, built.source_url), Endpoint.parse(Side.TARGET, built.target_url)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr, force=True)
    mapping = load_mapping(example_mapping())
    code = _run_pipeline(*endpoints, lambda: kit.tell(built, mapping, seed, files=not no_files))
    _demo_reach(built.source_url, built.target_url, own=source is None, since=scenario.COPY_DATE)
    sys.exit(code)


def _demo_reach(source_url: str, target_url: str, *, own: bool, since: datetime) -> None:
    """Ready-to-paste lines for the demo's databases; only the demo's own throwaway passwords are shown."""
    if own:
        render.say("\nThe demo's databases (the passwords are the demo's own throwaway ones):")
        urls = source_url, target_url
    else:
        render.say("\nYour databases (passwords hidden: put yours back in):")
        urls = redact(source_url), redact(target_url)
    render.say(f"export SYNC_SOURCE_URL='{urls[0]}'\nexport SYNC_TARGET_URL='{urls[1]}'")


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
        parsed = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        if parsed > datetime.now(UTC):
            self.fail(
                f"{value} is in the future: no row has changed since then (a date or instant in the past)"
            )
        return parsed


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
        inner = first_cause(exc)
        message = target.redact(source.redact(first_line(inner)))
        code, advice = cause_of(inner)
        fail(f"the run failed: {message}; {advice}.", code)


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
@click.option("--jobs", type=click.IntRange(min=1), help="Tables copied in parallel (default: mapping).")
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
    endpoints = _endpoints(source, target)
    try:
        mapping = load_mapping(mapping_path)
    except SyncError as exc:
        fail(str(exc), exc.exit_code)
    mode = auth_mode or mapping.sync.auth
    admin_api = _admin_api(mode, supabase_url, service_role_key)
    auth_options = AuthOptions(mode=mode, triggers=mapping.sync.triggers, concurrency=auth_concurrency)
    logging.basicConfig(
        level=logging.WARNING if quiet or as_json else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
        force=True,
    )
    progress = RunProgress(render.console, {}, enabled=not (quiet or as_json or interval))
    if auth_only:

        async def auth_work() -> AuthReport:
            with progress.shown():
                return await run_auth_only(*endpoints, auth_options, admin_api, progress)

        report = _run_pipeline(*endpoints, auth_work)
        if as_json:
            click.echo(report.model_dump_json(indent=2))
        elif not quiet:
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

    report = _run_pipeline(*endpoints, work)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    elif not quiet:
        render.run(report)
    sys.exit(report.exit_code)


def _follow_interval(follow: bool, every: str | None, auth_only: bool) -> timedelta | None:
    """The round interval of ``--follow`` (None without it); bad combinations and values exit 2."""
    if not follow:
        if every is not None:
            fail("--every sets the interval of --follow: add --follow, or leave --every out.")
        return None
    if auth_only:
        fail("--follow repeats whole catch-up runs: it does not combine with --auth-only.")
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
    if not (quiet or as_json):
        render.follow_start(every)

    def on_round(round_: FollowRound) -> None:
        if as_json:
            click.echo(round_.model_dump_json())
        elif not quiet:
            render.follow_round(round_)
        logging.getLogger().setLevel(logging.WARNING)  # the sides and notes were named by the first round

    end = _run_pipeline(*endpoints, lambda: follow(run_round, options, every, on_round))
    if not (quiet or as_json):
        render.follow_end(end)
    sys.exit(end.exit_code)


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
    else:
        render.status(report)


@main.command("verify")
@source_option("The production database, only ever read [env SYNC_SOURCE_URL].")
@target_option("The target database, only read here [env SYNC_TARGET_URL].")
@mapping_option("Mapping file (default: mappings/sync.toml when present, else built-in defaults).")
@click.option(
    "--since",
    type=Instant(),
    metavar="DATE",
    help="Check only the rows in this window (since-column at or after it; default: everything "
    "production holds).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print the checks as JSON (the VerifyReport model), every key."
)
@click.option(
    "--check-password",
    "check_email",
    metavar="EMAIL",
    help="Only say whether a password would sign this user in on the target, by the Auth server's own "
    "checks. The password is read without echo (one line from stdin when it is not a terminal) and never "
    "printed. Exit 0 yes, 4 no (with the reason), 1 a hash kind this tool cannot check.",
)
@click.option(
    "--aud",
    default=DEFAULT_AUD,
    show_default=True,
    help="With --check-password: the audience the target's Auth server signs in with (GOTRUE_JWT_AUD).",
)
def verify_command(
    source: str | None,
    target: str | None,
    mapping_path: Path | None,
    since: datetime | None,
    as_json: bool,
    check_email: str | None,
    aud: str,
) -> None:
    """Prove the target holds production's users and rows, equal on the common columns.

    Compares in the databases (hash aggregates per key bucket, then only the differing buckets row by
    row) and names every row missing, different (with its columns), deleted in production, quarantined
    or orphaned, and every user the Auth server could not load or sign in. Reads both databases,
    writes nothing. Exit 0 when everything in scope is equal, 4 otherwise, 2 when refused.
    """
    if check_email is not None:
        _check_password(target, check_email, aud, as_json=as_json)
    endpoints = _endpoints(source, target)
    try:
        mapping = load_mapping(mapping_path)
    except SyncError as exc:
        fail(str(exc), exc.exit_code)

    report = _run_pipeline(*endpoints, lambda: _verify(endpoints, mapping, since, show=not as_json))
    if as_json:
        click.echo(report.model_dump_json(indent=2))
    else:
        render.verify(report)
    sys.exit(report.exit_code)


def _check_password(target: str | None, email: str, aud: str, *, as_json: bool) -> NoReturn:
    """``sync verify --check-password``: one line (or the SignIn model), exit 0, 4 or 1."""
    if not email.strip():
        fail("--check-password needs the user's e-mail address.")
    try:
        endpoint = Endpoint.parse(Side.TARGET, target)
    except SyncError as exc:
        fail(str(exc), exc.exit_code)
    stdin = sys.stdin
    if stdin.isatty():
        password = getpass.getpass(f"Password for {email}: ")
    else:
        password = stdin.readline().removesuffix("\n").removesuffix("\r")
    answer = _run_pipeline(endpoint, endpoint, lambda: check_sign_in(endpoint, email.strip(), password, aud))
    if as_json:
        click.echo(answer.model_dump_json(indent=2))
    else:
        render.sign_in(answer)
    sys.exit(answer.exit_code)


async def _verify(
    endpoints: tuple[Endpoint, Endpoint], mapping: Mapping, since: datetime | None, *, show: bool = True
) -> VerifyReport:
    return await verify_sides(*endpoints, mapping, since, named=render.endpoints if show else None)


MAINTENANCE_REFUSED = (
    "sync cutover needs production in maintenance mode (no writes until it ends): say so with --yes "
    "(there is no terminal to ask on); nothing was written."
)


@main.command("cutover")
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
    endpoints = _endpoints(source, target)
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
    admin_api = _admin_api(mode, supabase_url, service_role_key)
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

    report = _run_pipeline(*endpoints, work)
    render.verify(report.verify)
    render.cutover(report)
    if paths:
        paths[0].write_text(report.model_dump_json(indent=2) + "\n")
        paths[1].write_text(to_markdown(report))
        render.say(f"report: {paths[0]} and {paths[1]}")
    sys.exit(report.exit_code)


def storage_stage(
    mapping: Mapping,
    access: tuple[str | None, str | None, str | None, str | None],
    concurrency: int | None,
    progress: RunProgress | None = None,
) -> StorageStage | None:
    """The run's storage stage when the mapping names files; None (and a warning) without both projects'
    Storage API URL and key, or when it names none."""
    if not (mapping.storage.buckets or any(rule.storage for rule in mapping.tables.values())):
        return None
    if not all(access):
        logging.getLogger("sync").warning(
            "files: not copied: the mapping names Storage objects, but --source-supabase-url, "
            "--source-service-role-key, --supabase-url and --service-role-key are not all given"
        )
        return None
    source_url, source_key, target_url, target_key = (str(a) for a in access)
    settings = TransferSettings(concurrency=concurrency or mapping.storage.concurrency)
    return StorageStage(
        StorageAccess(source_url, source_key, target_url, target_key),
        settings,
        progress=progress.files if progress else None,
        totals=progress.files_total if progress else None,
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
        render.quarantine_retry(report)
    sys.exit(report.exit_code)
