"""The production-delete search of a run, beside its other stages: started at once, reading the source
in the run's snapshot, and telling the auth import the deleted accounts when it may read the target."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime
from uuid import UUID

from sync.census import Census
from sync.connect import Endpoint
from sync.deletes import DeletesReport, counted, find_deletes
from sync.deletes.basis import Basis
from sync.modes import DeleteMode
from sync.plan import Plan
from sync.snapshot import SourceSnapshot


async def production_deletes(
    snapshot: SourceSnapshot,
    target: Endpoint,
    plan: Plan,
    mode: DeleteMode,
    basis: Basis | None,
    census: Census | None,
    on_users: Callable[[set[str]], None] | None = None,
    copied: datetime | None = None,
) -> tuple[DeletesReport, set[str]]:
    """Find (and when asked, apply) production deletes, reading the source in the run's snapshot (the
    census's counts, when it took them there); ``on_users`` learns the deleted users' ids first;
    ``copied`` is the copy date, when the run reads it already."""
    tallies = census.tallies if census is not None else None
    settled = counted(plan.tables, mode, basis, tallies) if snapshot.shared else None
    if settled is not None:
        if on_users is not None:
            on_users(set())
        return settled, set()
    reader = await snapshot.reader()
    try:
        shared = snapshot.shared
        basis = basis if shared else None
        tallies = tallies if shared else None
        found = await find_deletes(
            reader,
            target,
            plan.tables,
            copied=copied,
            mode=mode,
            basis=basis,
            tallies=tallies,
            on_users=on_users,
        )
    except BaseException:
        reader.terminate()
        raise
    snapshot.give_back(reader)
    return found


def deletes_beside(
    find: Callable[[Callable[[set[str]], None]], Awaitable[tuple[DeletesReport, set[str]]]],
    applied: bool = False,
) -> tuple[asyncio.Task[tuple[DeletesReport, set[str]]], asyncio.Future[frozenset[UUID]]]:
    """Start ``find`` (given a callback for the deleted users' ids); return it and the deleted users
    (its failure, if it failed first).

    The auth import stages production's users meanwhile and waits for the deleted ones before it reads
    the target's. Only reported, they are known as soon as the search knows them, and the search goes on
    beside the run's writes (it reads the target in its own first snapshot). ``applied`` (or soft), they
    are known once the search has ended and its deletes are committed: the import must find the target
    without those users, or it would hold back a person who signed up again for an account going away.
    """
    users: asyncio.Future[frozenset[UUID]] = asyncio.get_running_loop().create_future()

    def given(ids: set[str]) -> None:
        if not users.done():
            users.set_result(frozenset(UUID(k) for k in ids))

    def known(ids: set[str]) -> None:
        if not applied:
            given(ids)

    def ended(task: asyncio.Task[tuple[DeletesReport, set[str]]]) -> None:
        if users.done():
            return
        if task.cancelled():
            users.cancel()
            return
        if task.exception() is None:
            given(task.result()[1])
            return
        users.set_exception(task.exception())  # type: ignore[arg-type]
        # Marked as seen: when no import waits for the users, the run meets the failure in the search.
        users.exception()

    finding = asyncio.create_task(find(known))
    finding.add_done_callback(ended)
    return finding, users
