"""The admin-API import as the tests run it: against the local stand-in, with short waits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from admin_api_server import AdminApiServer

from devkit.testbed import Database
from sync.auth import AdminApi, AuthOptions, AuthReport, import_users
from sync.connect import Endpoint, Side

# Short waits: the server's faults are immediate, only the number of retries matters here.
FAST = {"retry_initial_wait": 0.01, "retry_max_wait": 0.2, "retry_attempts": 12}


async def run_api(
    source: Database,
    target: Database | None,
    server: AdminApiServer,
    key: str = "service-role-key",
    **options: Any,
) -> AuthReport:
    """The admin-API import; with ``target``, what the API cannot carry is written there directly."""
    source_endpoint = Endpoint.parse(Side.SOURCE, source.url)
    target_endpoint = Endpoint.parse(Side.TARGET, target.url) if target is not None else None
    return await import_users(
        source_endpoint,
        target_endpoint,
        AuthOptions(mode="admin-api", **(FAST | options)),
        admin_api=AdminApi(url=server.url, service_role_key=key),
    )


@dataclass(frozen=True)
class FirstApiImport:
    """The seed scenario's users imported once through the admin API, the target DSN given: the names of
    the databases as that run left them, its report and what the Auth server counted."""

    source: str
    target: str
    report: AuthReport
    creates: int
    created_ids: list[str]


async def import_through_the_api(source: Database, target: Database) -> FirstApiImport:
    """Import ``source``'s users into ``target`` through a stand-in Auth server of ``target``."""
    async with AdminApiServer(target.url) as api:
        report = await run_api(source, target, api)
    return FirstApiImport(source.name, target.name, report, api.creates, list(api.created_ids))
