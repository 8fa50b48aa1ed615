"""The ``sync`` command line: parses options, calls the engine, prints results. Nothing else.

One module per command (``demo``, ``plan``, ``run`` with ``quarantine retry``, ``status``, ``verify``,
``cutover``); what they share (options, one-line failures, running the engine) is in ``common``.
Printing is in :mod:`sync.render`. A command's module is imported only when that command runs (or
help lists it), so ``sync run`` starts without loading what ``verify`` or ``demo`` need.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import sys
import threading

import click

COMMANDS = {
    "demo": ("sync.cli.demo", "demo"),
    "plan": ("sync.cli.plan", "plan_command"),
    "run": ("sync.cli.run", "run_command"),
    "status": ("sync.cli.status", "status_command"),
    "verify": ("sync.cli.verify", "verify_command"),
    "cutover": ("sync.cli.cutover", "cutover_command"),
    "quarantine": ("sync.cli.run", "quarantine_group"),
}
"""Command name → (module, attribute) of its click command."""


class Commands(click.Group):
    """The commands of :data:`COMMANDS`, each imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, attribute = COMMANDS[cmd_name]
        return getattr(importlib.import_module(module), attribute)


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="supabase-sync")
def main() -> None:
    """Bring the users and rows a Supabase production database gained into a target whose schema moved on."""


def entry() -> None:
    """``sync`` as a program: :func:`main`, then an exit that skips tearing the interpreter down.

    Freeing hundreds of modules' objects one by one takes a tenth of a second, longer than a quiet
    catch-up's own work on a small database. Output is flushed and exit handlers run first; while any
    other thread is still alive, the exit is the ordinary one.
    """
    try:
        main()
        code: object = 0
    except SystemExit as done:
        code = done.code
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    status = 0 if code is None else code if isinstance(code, int) else 1
    if threading.active_count() > 1:
        sys.exit(status)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError):  # a reader that went away (``sync status | head``)
            stream.flush()
    os._exit(status)
