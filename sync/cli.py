"""The ``sync`` command line: parses options, calls the engine, prints results. Nothing else."""

from __future__ import annotations

import sys

import click
from rich.console import Console
from rich.table import Table

from sync import scenario
from sync.embedded import EmbeddedError

EXIT_USAGE = 2

console = Console()
errors = Console(stderr=True)


def fail(message: str, code: int = EXIT_USAGE) -> None:
    """Print one clear line on stderr and exit with ``code``."""
    errors.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="supabase-sync")
def main() -> None:
    """Bring the users and rows a Supabase production database gained into a target whose schema moved on."""


@main.command()
@click.option(
    "--source",
    envvar="SYNC_SOURCE_URL",
    metavar="DSN",
    help="Build production here instead of on the embedded server [env SYNC_SOURCE_URL].",
)
@click.option(
    "--target",
    envvar="SYNC_TARGET_URL",
    metavar="DSN",
    help="Build development here instead of on the embedded server [env SYNC_TARGET_URL].",
)
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
    default=scenario.DEFAULT_SEED,
    show_default=True,
    help="Seed of the generator: the same seed builds the same rows.",
)
@click.option("--no-sync", is_flag=True, help="Only build the scenario; do not run the sync on it.")
def demo(source: str | None, target: str | None, scale: int, seed: int, no_sync: bool) -> None:
    """Build the seed scenario (production and development databases) and show both sides' counts."""
    from sync import demo as demo_mod

    if (source is None) != (target is None):
        fail("give both --source and --target, or neither (the embedded server is used then).")
    try:
        if source and target:
            built = demo_mod.build(source, target, scale, seed)
        else:
            with console.status("Starting PostgreSQL and building the scenario…"):
                built = demo_mod.build_on_embedded(scale, seed)
    except (demo_mod.DemoError, EmbeddedError) as exc:
        fail(str(exc), code=1)
    console.print(f"Scenario built in {built.seconds:.1f} s (scale {scale}, seed {seed}).")
    _print_counts(scenario.table_counts(built.source_url), scenario.table_counts(built.target_url))
    console.print(f"production:  {_safe(built.source_url)}\ndevelopment: {_safe(built.target_url)}")


def _print_counts(production: dict[str, int], development: dict[str, int]) -> None:
    table = Table(title="Seed scenario")
    table.add_column("table")
    table.add_column("production (source)", justify="right")
    table.add_column("development (target)", justify="right")
    for name in dict.fromkeys([*production, *development]):
        table.add_row(name, _count(production.get(name)), _count(development.get(name)))
    console.print(table)


def _count(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


def _safe(url: str) -> str:
    from sync.embedded import redact_url

    return redact_url(url)
