"""``sync verify``: equality of production and the target, and one user's sign-in."""

from __future__ import annotations

import getpass
import sys
from datetime import datetime
from pathlib import Path
from typing import NoReturn

import click

from sync import render
from sync.auth.columns import DEFAULT_AUD
from sync.cli.common import (
    Instant,
    fail,
    mapping_of,
    mapping_option,
    parse_endpoints,
    run_pipeline,
    source_option,
    target_option,
)
from sync.connect import Endpoint, Side
from sync.errors import SyncError
from sync.mapping import Mapping
from sync.verify import VerifyReport
from sync.verify.sides import verify_sides
from sync.verify.signin import check_sign_in


@click.command("verify")
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
    endpoints = parse_endpoints(source, target)
    mapping = mapping_of(mapping_path)

    report = run_pipeline(*endpoints, lambda: _verify(endpoints, mapping, since, show=not as_json))
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
    answer = run_pipeline(endpoint, endpoint, lambda: check_sign_in(endpoint, email.strip(), password, aud))
    if as_json:
        click.echo(answer.model_dump_json(indent=2))
    else:
        render.sign_in(answer)
    sys.exit(answer.exit_code)


async def _verify(
    endpoints: tuple[Endpoint, Endpoint], mapping: Mapping, since: datetime | None, *, show: bool = True
) -> VerifyReport:
    return await verify_sides(*endpoints, mapping, since, named=render.endpoints if show else None)
