"""The ``sync`` command line: parses options, calls the engine, prints results. Nothing else.

One module per command (``demo``, ``plan``, ``run`` with ``quarantine retry``, ``status``, ``verify``,
``cutover``); what they share (options, one-line failures, running the engine) is in ``common``.
Printing is in :mod:`sync.render`.
"""

from __future__ import annotations

import click

from sync.cli.cutover import MAINTENANCE_REFUSED, cutover_command
from sync.cli.demo import demo
from sync.cli.plan import plan_command
from sync.cli.run import quarantine_group, run_command
from sync.cli.status import status_command
from sync.cli.verify import verify_command

__all__ = ["MAINTENANCE_REFUSED", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="supabase-sync")
def main() -> None:
    """Bring the users and rows a Supabase production database gained into a target whose schema moved on."""


for command in (
    demo,
    plan_command,
    run_command,
    status_command,
    verify_command,
    cutover_command,
    quarantine_group,
):
    main.add_command(command)
