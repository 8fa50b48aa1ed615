"""``sync demo``: the seed scenario, built and told from plan to cutover."""

from __future__ import annotations

import logging
import sys
from datetime import datetime

import click

from sync import render
from sync.cli.common import (
    fail,
    run_pipeline,
    source_option,
    target_option,
)
from sync.connect import Endpoint, Side, redact
from sync.errors import EXIT_FAILED
from sync.mapping import load_mapping
from sync.resources import example_mapping

DEVKIT_MISSING = (
    "sync demo needs the development kit (devkit/), which is not part of the installed package: "
    "run it from a clone of the project (`make demo`)."
)


@click.command()
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
    code = run_pipeline(*endpoints, lambda: kit.tell(built, mapping, seed, files=not no_files))
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
