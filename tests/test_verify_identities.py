"""`sync verify` after an admin-API import: the e-mail identity the Auth server writes with every user it
creates is production's own when production had one (equal), and an extra identity when it did not."""

from __future__ import annotations

import asyncio
import json

import pytest
from click.testing import CliRunner
from queries import SEED_MAPPING, execute, fetch

from sync.cli import main


def providers(url: str, ids: list[str]) -> dict[str, set[str]]:
    rows = fetch(
        url,
        "SELECT user_id::text, array_agg(provider) FROM auth.identities WHERE user_id = ANY(%s::uuid[]) "
        "GROUP BY 1",
        ids,
    )
    return {user: set(names) for user, names in rows}


@pytest.mark.xdist_group("first-api-import")
async def test_an_api_created_users_email_identity_is_equal_when_production_had_one_and_extra_when_not(
    api_imported_dbs, first_api_import
):
    source, target = api_imported_dbs
    created = sorted(set(first_api_import.created_ids))
    production, landed = providers(source.url, created), providers(target.url, created)
    had_email = {u for u in created if "email" in production.get(u, set())}
    google_only = sorted(u for u in created if production.get(u) == {"google"})
    assert had_email and google_only
    assert all("email" in landed.get(u, set()) for u in had_email)  # written by the Auth server, not copied
    # A Google-only production user created through the API: the server gives it an e-mail identity.
    execute(
        target.url,
        "INSERT INTO auth.identities (provider_id, user_id, identity_data, provider, created_at, updated_at) "
        "SELECT u.id::text, u.id, jsonb_build_object('sub', u.id::text, 'email', u.email), 'email', now(), "
        "now() FROM auth.users AS u WHERE u.id = ANY(%s::uuid[]) AND NOT EXISTS (SELECT FROM auth.identities "
        "AS i WHERE i.user_id = u.id AND i.provider = 'email')",
        google_only,
    )

    result = await asyncio.to_thread(
        CliRunner().invoke,
        main,
        ["verify", "--source", source.url, "--target", target.url, "--mapping", str(SEED_MAPPING), "--json"],
    )
    users = json.loads(result.stdout)["users"]
    flagged = {d["key"] for d in users["different"] if "identities" in d["columns"]}
    assert not flagged & had_email, "production's own e-mail identity is not an extra one"
    assert set(google_only) <= flagged, "an e-mail identity production never had is named"
