"""What every command shares: its options, one-line failures, and running the engine."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeVar

import asyncpg
import click
from pydantic import SecretStr

from sync.auth import AdminApi
from sync.connect import Endpoint, Side
from sync.errors import EXIT_FAILED, EXIT_USAGE, SyncError, cause_of, first_cause, first_line
from sync.mapping import Mapping, load_mapping
from sync.modes import DeleteMode
from sync.progress import RunProgress

if TYPE_CHECKING:
    from sync.storage.stage import StorageStage

T = TypeVar("T")


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print one clear line on stderr and exit with ``code``."""
    from sync import render  # rich loads only when a line is printed: a --json run starts without it

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


def parse_endpoints(source: str | None, target: str | None) -> tuple[Endpoint, Endpoint]:
    try:
        return Endpoint.parse(Side.SOURCE, source), Endpoint.parse(Side.TARGET, target)
    except SyncError as exc:
        fail(str(exc), exc.exit_code)


def admin_api_of(auth_mode: str, supabase_url: str | None, service_role_key: str | None) -> AdminApi | None:
    if auth_mode != "admin-api":
        return None
    if not supabase_url or not service_role_key:
        fail(
            "--auth-mode admin-api needs --supabase-url and --service-role-key "
            "(or SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY)."
        )
    return AdminApi(url=supabase_url, service_role_key=SecretStr(service_role_key))


def run_pipeline(source: Endpoint, target: Endpoint, work: Callable[[], Awaitable[T]]) -> T:
    """Run ``work``; user errors and database failures become one line and an exit code."""
    # What start-up made (modules, options) lives as long as the process: the collector's full passes
    # leave it out, so one that comes while many rows are in flight does not walk it all again.
    gc.freeze()
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
    # Imported here: the stage, its selection and transfers load only when a run moves files.
    from sync.storage.stage import StorageAccess, StorageStage
    from sync.storage.transfer import TransferSettings

    source_url, source_key, target_url, target_key = (str(a) for a in access)
    settings = TransferSettings(concurrency=concurrency or mapping.storage.concurrency)
    return StorageStage(
        StorageAccess(source_url, source_key, target_url, target_key),
        settings,
        progress=progress.files if progress else None,
        totals=progress.files_total if progress else None,
    )


def mapping_of(path: Path | None) -> Mapping:
    """The mapping file at ``path`` (or the default), or one line and exit 2."""
    try:
        return load_mapping(path)
    except SyncError as exc:
        fail(str(exc), exc.exit_code)
