"""A run keeps a few connections per side and hands them from stage to stage and table to table: a
catch-up against a remote server pays for few connections, and what one table leaves on a connection
never reaches the next."""

from __future__ import annotations

import asyncio
from collections import Counter

import asyncpg
import pytest
from queries import SEED_APP_TABLES, execute, seed_sync

from devkit import scenario
from sync.pool import IdleConnections

APP = SEED_APP_TABLES
sync_run = seed_sync


def production_goes_on(source) -> None:
    """A few edits in every app table and of some users, as the app makes them."""
    for table in (*APP, "auth.users"):
        execute(
            source.url,
            f"UPDATE {table} SET updated_at = now() WHERE id IN (SELECT id FROM {table} ORDER BY id LIMIT 3)",
        )


@pytest.fixture
def caught_up_once(seed_dbs):
    """The seed after a first run, then production edits in every table: a catch-up reads each table."""
    source, target = seed_dbs
    assert sync_run(source, target, since=scenario.COPY_DATE).exit_code == 0
    production_goes_on(source)
    return source, target


@pytest.fixture
def opened(monkeypatch) -> Counter[tuple[str, str]]:
    """Every connection the run opens, counted by (database, application name)."""
    counts: Counter[tuple[str, str]] = Counter()
    real = asyncpg.connect

    async def counting(*args, **kwargs):
        name = (kwargs.get("server_settings") or {}).get("application_name", "")
        counts[(kwargs.get("database") or "", name)] += 1
        return await real(*args, **kwargs)

    monkeypatch.setattr(asyncpg, "connect", counting)
    return counts


def test_a_catch_up_hands_its_connections_from_stage_to_stage(caught_up_once, opened):
    source, target = caught_up_once
    report = sync_run(source, target)
    assert report.exit_code == 0
    assert {t.table for t in report.tables if t.written} == set(APP)
    # Four tables copied, each on a source reader and a target connection (one pair a table, and one
    # reader for each of the census's two scans, the production-delete search and the auth import, was
    # eight readers and four target connections): the readers the census opened serve every later
    # stage, and the target connections the first copies opened serve the later ones.
    assert opened[(target.name, "sync writer")] < len(APP), opened
    assert opened[(source.name, "sync reader")] <= 3, opened


def test_a_connection_handed_on_carries_nothing_from_the_table_before(caught_up_once, monkeypatch):
    source, target = caught_up_once
    handed: set[int] = set()
    states: list[tuple] = []
    real_take, real_give_back = IdleConnections.take, IdleConnections.give_back

    def give_back(self, conn):
        handed.add(id(conn))
        real_give_back(self, conn)

    async def take(self):
        conn = await real_take(self)
        if id(conn) in handed and await conn.fetchval("SELECT current_database()") == target.name:
            states.append(
                (
                    conn.is_in_transaction(),
                    *await conn.fetchrow(
                        "SELECT to_regclass('pg_temp._sync_stage') IS NULL, "
                        "current_setting('session_replication_role'), current_setting('lock_timeout')"
                    ),
                )
            )
        return conn

    monkeypatch.setattr(IdleConnections, "take", take)
    monkeypatch.setattr(IdleConnections, "give_back", give_back)
    report = sync_run(source, target, jobs=1)
    assert report.exit_code == 0
    assert states, "no target connection was handed from one table to the next"
    assert set(states) == {(False, True, "origin", "3s")}


def test_a_handed_on_connection_the_server_ended_is_replaced(caught_up_once, monkeypatch):
    source, target = caught_up_once
    ended: list[int] = []
    real_take = IdleConnections.take

    async def take(self):
        idle = [conn for conn in self._idle if not conn.is_closed()]
        if idle and len(ended) < 3:
            pid = idle[-1].get_server_pid()  # read first: the driver drops it once it sees the end
            admin = await asyncpg.connect(target.admin_url)
            try:
                await admin.execute("SELECT pg_terminate_backend($1)", pid)
            finally:
                await admin.close()
            ended.append(pid)
            for _ in range(100):  # the driver reads the server's goodbye while the loop runs
                if idle[-1].is_closed():
                    break
                await asyncio.sleep(0.01)
        return await real_take(self)

    monkeypatch.setattr(IdleConnections, "take", take)
    report = sync_run(source, target)
    assert ended, "no idle connection was there to end"
    assert report.exit_code == 0
    assert {t.table for t in report.tables if t.written} == set(APP)
    again = sync_run(source, target)  # everything landed: the next catch-up finds nothing to write
    assert again.exit_code == 0
    assert all(t.written == 0 for t in again.tables)
