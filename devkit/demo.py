"""The seed scenario on a server: build production and development databases, then tell the whole story.

:func:`tell` is what ``make demo`` shows: the plan, the first run, production going on, a catch-up, the
cutover and its success metrics, with files through two local Storage APIs.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import bcrypt
import psycopg

from devkit import SQL_DIR, scenario, testbed
from devkit.changes import make_production_changes
from devkit.embedded import ensure_server
from sync import render
from sync.auth import AuthOptions
from sync.connect import Endpoint, Side
from sync.cutover import cutover
from sync.errors import EXIT_FAILED, first_line
from sync.mapping import Mapping
from sync.modes import DeleteMode
from sync.preview import preview
from sync.run import RunOptions, auth_import, run_sync
from sync.storage.stage import StorageAccess, StorageStage
from sync.storage.transfer import TransferSettings

DEMO_SOURCE = "sync_demo_production"
DEMO_TARGET = "sync_demo_development"
SERVICE_KEY = "service-role-key"
"""The service-role key of the demo's local Storage APIs."""
ROLES = ("anon", "authenticated", "service_role", "supabase_auth_admin", "supabase_storage_admin", "postgres")
"""The cluster roles Supabase's schemas are granted to and owned by."""


class DemoError(RuntimeError):
    """The scenario cannot be built where it was asked to be; the message says why."""


@dataclass(frozen=True)
class DemoDatabases:
    """Where the scenario was built, and how long it took."""

    source_url: str
    target_url: str
    seconds: float
    files: dict[str, list[str]] = field(default_factory=dict)
    """The documents' file paths each project holds: ``production`` and ``development``."""
    shaped: tuple[str, ...] = ()
    """The sides that were plain PostgreSQL and were given Supabase's shape first."""


def build_on_embedded(scale: int, seed: int) -> DemoDatabases:
    """Build the scenario into fresh demo databases on the project's own server (or DATABASE_URL)."""
    server = ensure_server()
    template = testbed.supabase_template(server)
    dbs = []
    for name in (DEMO_SOURCE, DEMO_TARGET):
        testbed.drop_database(server, name)
        dbs.append(testbed.create_database(server, name, template=template.name))
    return build(dbs[0].url, dbs[1].url, scale, seed)


def build(source_url: str, target_url: str, scale: int, seed: int) -> DemoDatabases:
    """Build the scenario into two databases a user names: Supabase ones, or empty plain ones.

    An empty database without the auth schema is given Supabase's shape first (the roles and the
    auth and storage schemas of ``devkit/sql/supabase``), when the login may create them.
    """
    shaped = tuple(
        side for side, url in (("source", source_url), ("target", target_url)) if _needs_shape(side, url)
    )
    for side in shaped:
        _apply_shape(side, source_url if side == "source" else target_url)
    started = time.perf_counter()
    data = scenario.generate(scale=scale, seed=seed)
    scenario.build_production(source_url, data)
    scenario.build_development(target_url, data)
    files = {
        "production": scenario.document_files(data.production),
        "development": scenario.document_files(data.dev_only),
    }
    return DemoDatabases(source_url, target_url, time.perf_counter() - started, files, shaped)


@asynccontextmanager
async def storage_projects(built: DemoDatabases, root: Path) -> AsyncIterator[StorageAccess]:
    """Both projects' Storage API, holding the scenario's files: the repository's local Storage server
    (the one the tests use) on each database, its bytes under ``root``."""
    from tests.storage_api_server import StorageApiServer

    async with (
        StorageApiServer(built.source_url, root / "production", SERVICE_KEY) as production,
        StorageApiServer(built.target_url, root / "development", SERVICE_KEY) as development,
    ):
        await scenario.upload_files(production.url, SERVICE_KEY, built.files["production"])
        await scenario.upload_files(development.url, SERVICE_KEY, built.files["development"])
        yield StorageAccess(production.url, SERVICE_KEY, development.url, SERVICE_KEY)


def _needs_shape(side: str, url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=10) as conn:
            auth, profiles = conn.execute(
                "SELECT to_regclass('auth.users'), to_regclass('public.profiles')"
            ).fetchone()  # type: ignore[misc]
    except psycopg.OperationalError as exc:
        raise DemoError(f"Cannot connect to the {side} database: {first_line(exc)}") from None
    if profiles is not None:
        raise DemoError(f"The {side} database already has public.profiles: use an empty database.")
    return auth is None


def _apply_shape(side: str, url: str) -> None:
    """Create Supabase's per-database schemas in an empty database, or say what is missing.

    The cluster's roles are never created or altered here (``roles.sql`` resets the ``postgres``
    login): when they are missing, the line says to run that file first.
    """
    shape = SQL_DIR / "supabase"
    with psycopg.connect(url, autocommit=False) as conn:
        present = {
            r[0] for r in conn.execute("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", (list(ROLES),))
        }
        user = conn.execute("SELECT current_user").fetchone()[0]  # type: ignore[index]
        missing = [r for r in ROLES if r not in present]
        if missing:
            raise DemoError(
                f"The {side} server lacks Supabase's roles ({', '.join(missing)}): run {shape / 'roles.sql'} "
                "there as a superuser once (it makes postgres a non-superuser login with the password "
                "'postgres'), then run sync demo again."
            )
        try:
            conn.execute((shape / "schema.sql").read_text())  # type: ignore[arg-type]
        except psycopg.Error as exc:
            raise DemoError(
                f"The {side} database has no auth schema and role {user!r} may not create it "
                f"({first_line(exc)}): connect as a superuser, or use a Supabase project's database."
            ) from None


def verify_logins(target_url: str, sample: int = 25) -> tuple[int, int]:
    """How many of ``sample`` production users (the cost-10 ones included) verify on the target.

    Production's users are those whose e-mail is not a development tester's; the password comes from
    the scenario's rule. Returns (checked, verified).
    """
    with psycopg.connect(target_url) as conn:
        rows = conn.execute(
            "SELECT email, encrypted_password FROM auth.users WHERE email IS NOT NULL "
            "AND email NOT LIKE %s AND encrypted_password LIKE '$2%%' "
            "ORDER BY encrypted_password LIKE '$2b$10$%%' DESC, id LIMIT %s",
            ("%@ultima.dev", sample),
        ).fetchall()
    verified = sum(
        bcrypt.checkpw(scenario.password_for(email).encode(), hashed.encode()) for email, hashed in rows
    )
    return len(rows), verified


@asynccontextmanager
async def _file_stage(
    built: DemoDatabases, mapping: Mapping, files: bool
) -> AsyncIterator[StorageStage | None]:
    """The runs' storage stage between the two local Storage APIs, or None without files."""
    if not files:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="sync-demo-storage-") as root:
        async with storage_projects(built, Path(root)) as access:
            yield StorageStage(access, TransferSettings(concurrency=mapping.storage.concurrency))


async def tell(built: DemoDatabases, mapping: Mapping, seed: int, *, files: bool = True) -> int:
    """The story from the first plan to the cutover, printed as the commands would; the exit code.

    ``files``: through two local Storage APIs holding the scenario's files (without: rows and users only).
    """
    endpoints = Endpoint.parse(Side.SOURCE, built.source_url), Endpoint.parse(Side.TARGET, built.target_url)
    since = scenario.COPY_DATE
    keys = " --source-supabase-url … --supabase-url …" if files else ""
    async with _file_stage(built, mapping, files) as stage:

        async def run(options: RunOptions) -> None:
            users = auth_import(AuthOptions())
            render.run(await run_sync(*endpoints, mapping, options, auth_stage=users, storage_stage=stage))

        render.say(f"\n$ sync plan --since {since:%Y-%m-%d}")
        render.plan(await preview(*endpoints, mapping, since))
        render.say(f"\n$ sync run --since {since:%Y-%m-%d}{keys}")
        await run(RunOptions(since=since))
        render.say("\nProduction keeps going until the maintenance window:")
        for line in make_production_changes(built.source_url, seed):
            render.say(f"  - {line}")
        render.say(f"\n$ sync run{keys}  (a catch-up: what changed since the last run)")
        await run(RunOptions())
        render.say("\nProduction goes into maintenance mode.")
        render.say(f"$ sync cutover --yes --deletes apply{keys}")
        report = await cutover(
            *endpoints,
            mapping,
            deletes=DeleteMode.APPLY,
            auth_stage=auth_import(AuthOptions()),
            storage_stage=stage,
            caught_up=render.run,
        )
    render.counts(scenario.table_counts(built.source_url), scenario.table_counts(built.target_url))
    render.verify(report.verify)
    checked, verified = verify_logins(built.target_url, sample=25)
    render.say(
        f"Password check: {verified} of {checked} sampled production users (5 at bcrypt cost 10) verify "
        "their production password against the target's hash.",
        None if verified == checked else "red",
    )
    render.cutover(report)
    return report.exit_code or (0 if verified == checked else EXIT_FAILED)
