"""``sync status``: the runs recorded in the target."""

from __future__ import annotations

import asyncio

import click

from sync import render
from sync.cli.common import (
    fail,
    target_option,
)
from sync.connect import Endpoint, Side
from sync.errors import SyncError
from sync.status import read_status


@click.command("status")
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
