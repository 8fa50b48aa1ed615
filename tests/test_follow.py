"""`sync run --follow` keeps the target close to production until Ctrl-C, one line per round.

The follow runs as a real process (`python -m sync run --follow`) against the seed scenario while the
test writes to production; Ctrl-C is a real SIGINT.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import bcrypt
import psycopg
import pytest
from click.testing import CliRunner
from queries import SEED_MAPPING, ctrl_c_heard, fetch

from sync.cli import main
from sync.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from sync.follow import parse_every
from sync.status import StatusReport

WAIT = 300
"""Seconds a step may take before the test gives up (a guard against a hung process, not a measurement)."""


class Follow:
    """A `sync run --follow` process whose stdout lines the test reads as they come."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sync", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=ctrl_c_heard,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def until(self, pattern: str) -> re.Match[str]:
        """The next stdout line matching ``pattern`` (earlier lines are kept in ``seen``)."""
        while True:
            try:
                line = self.lines.get(timeout=WAIT)
            except queue.Empty:
                pytest.fail(f"no line matching {pattern!r} in {WAIT} s; saw {self.seen}")
            if line is None:
                pytest.fail(f"the follow ended before {pattern!r}: {self.seen} {self.stderr()}")
            self.seen.append(line)
            if found := re.search(pattern, line):
                return found

    def interrupt(self) -> int:
        """Ctrl-C, then the exit code."""
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout=WAIT)
        while (line := self.lines.get(timeout=WAIT)) is not None:
            self.seen.append(line)
        return code

    def stderr(self) -> str:
        return self.proc.stderr.read() if self.proc.stderr and self.proc.poll() is not None else ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def following(source, target, *extra: str) -> Iterator[Follow]:
    run = Follow(["run", "--follow", *endpoints(source, target), *extra])
    try:
        yield run
    finally:
        run.kill()


def endpoints(source, target) -> list[str]:
    return ["--source", source.url, "--target", target.url, "--mapping", str(SEED_MAPPING)]


ROUND = (
    r"round (\d+) at [\d:]+: ([\d,]+) rows, ([\d,]+) users brought, ([\d,]+) production deletes.*, lag (\S+)"
)


@dataclass
class Round:
    number: int
    rows: int
    users: int
    deletes: int
    lag: str


def next_round(run: Follow) -> Round:
    found = run.until(ROUND)
    number, rows, users, deletes = (int(found[i].replace(",", "")) for i in range(1, 5))
    return Round(number, rows, users, deletes, found[5])


def running_runs(target) -> list[str]:
    result = CliRunner().invoke(main, ["status", "--target", target.url, "--json"])
    assert result.exit_code == 0, result.output
    return [
        f"run {r.id}" for r in StatusReport.model_validate_json(result.stdout).runs if r.status == "running"
    ]


def plain_rerun(source, target) -> dict:
    result = CliRunner().invoke(main, ["run", *endpoints(source, target), "--json"])
    assert result.exit_code == EXIT_OK, result.output
    return json.loads(result.stdout)


def brought(report: dict) -> tuple[int, int]:
    """Rows and users a run wrote."""
    rows = sum(t["inserted"] + t["updated"] for t in report["tables"])
    auth = report["auth"] or {}
    return rows, auth.get("created", 0) + auth.get("updated", 0)


def sign_up(conn: psycopg.Connection) -> str:
    """A new production user, as the Auth server writes one (production's trigger adds the profile)."""
    user = str(uuid.uuid4())
    conn.execute(
        "INSERT INTO auth.users (instance_id, id, aud, role, email, encrypted_password, email_confirmed_at, "
        "confirmation_token, recovery_token, email_change_token_new, email_change, raw_app_meta_data, "
        "raw_user_meta_data, created_at, updated_at) VALUES ('00000000-0000-0000-0000-000000000000', %s, "
        "'authenticated', 'authenticated', %s, %s, now(), '', '', '', '', "
        '\'{"provider": "email", "providers": ["email"]}\', \'{}\', now(), now())',
        (
            user,
            f"follow-{user[:8]}@example.com",
            bcrypt.hashpw(b"a new password", bcrypt.gensalt(4)).decode(),
        ),
    )
    conn.execute(
        "INSERT INTO auth.identities (provider_id, user_id, identity_data, provider, created_at, updated_at) "
        "VALUES (%s, %s::uuid, jsonb_build_object('sub', %s::text), 'email', now(), now())",
        (user, user, user),
    )
    return user


def test_follow_brings_new_rows_without_a_restart_and_ctrl_c_leaves_nothing_running(seed_dbs):
    source, target = seed_dbs
    marker = f"follow {uuid.uuid4().hex[:8]}"
    with following(source, target, "--every", "1s", "--since", "2024-11-18") as run:
        first = next_round(run)
        # The first round takes the --since window: many rows, and no earlier round to measure lag from.
        assert first.number == 1 and first.rows > 1000 and first.lag == "—"
        while (caught_up := next_round(run)).rows or caught_up.users:
            pass
        assert caught_up.lag == "0.0"  # nothing was waiting

        (edited,) = fetch(source.url, "SELECT min(id) FROM public.financing_requests")[0]
        with psycopg.connect(source.url) as conn:  # one transaction: one round sees all of it
            user = sign_up(conn)
            conn.execute(
                "INSERT INTO public.financing_requests (profile_id, amount, term_months, purpose) "
                "VALUES (%s, 12345, 12, %s)",
                (user, marker),
            )
            # An edit that leaves updated_at alone is caught too (by transaction, not by clock).
            conn.execute("UPDATE public.financing_requests SET amount = 54321 WHERE id = %s", (edited,))

        while not (catch_up := next_round(run)).rows:
            pass
        assert catch_up.rows >= 3  # the profile, the new request, the edited one
        assert catch_up.users == 1
        assert float(catch_up.lag) > 0  # these changes had waited since the round before
        # The rows are on the target while the follow keeps running: no restart.
        assert fetch(target.url, "SELECT count(*) FROM auth.users WHERE id = %s", user) == [(1,)]
        assert fetch(
            target.url, "SELECT amount FROM public.financing_requests WHERE purpose = %s", marker
        ) == [(12345,)]
        landed = fetch(
            target.url,
            "SELECT amount FROM public.financing_requests WHERE id = coalesce((SELECT target_key::bigint "
            "FROM _sync.id_map WHERE table_name = 'public.financing_requests' AND source_key = %s), %s)",
            str(edited),
            edited,
        )
        assert landed == [(54321,)]

        code = run.interrupt()

    # Ctrl-C lands between rounds (exit 0) or inside one, which stops at its batch boundary (130).
    assert code in (EXIT_OK, EXIT_INTERRUPTED), run.seen
    ended = run.seen[-1]
    if code == EXIT_OK:
        assert ended.startswith("Stopped after") and "between rounds" in ended
    else:
        assert ended.startswith("Stopped during round") and "resumes it" in ended
    assert running_runs(target) == []
    # A plain rerun continues from where the follow stopped, and finds nothing more to bring.
    assert brought(plain_rerun(source, target)) == (0, 0)


def test_ctrl_c_between_rounds_ends_the_follow_with_exit_0(seed_dbs):
    source, target = seed_dbs
    with following(source, target, "--every", "1h", "--since", "2024-11-18") as run:
        run.until(ROUND)
        code = run.interrupt()
    assert code == EXIT_OK
    assert run.seen[-1] == "Stopped after 1 round(s), between rounds: nothing is left half done."
    assert running_runs(target) == []
    assert brought(plain_rerun(source, target)) == (0, 0)


def test_ctrl_c_inside_a_round_stops_it_at_a_batch_boundary_and_the_next_run_resumes_it(seed_dbs):
    source, target = seed_dbs
    # The test holds a write lock on a target table: the round blocks at its first write there.
    with psycopg.connect(target.admin_url) as blocker:
        blocker.execute("LOCK TABLE public.documents IN EXCLUSIVE MODE")
        with following(source, target, "--every", "1s", "--since", "2024-11-18") as run:
            run.until(r"^Following production")
            while not fetch(
                target.admin_url,
                "SELECT 1 FROM pg_stat_activity WHERE application_name LIKE 'sync%%' "
                "AND wait_event_type = 'Lock' AND datname = current_database()",
            ):
                assert run.proc.poll() is None, run.stderr()
                time.sleep(0.2)
            code = run.interrupt()
        blocker.rollback()

    assert code == EXIT_INTERRUPTED
    assert run.seen[-1].startswith("Stopped during round 1: its committed batches are kept")
    assert running_runs(target) == []
    statuses = fetch(target.url, "SELECT status FROM _sync.runs ORDER BY id")
    assert statuses == [("interrupted",)]
    resumed = plain_rerun(source, target)
    assert resumed["resumed"] is True and resumed["since"].startswith("2024-11-18")
    assert fetch(target.url, "SELECT status FROM _sync.runs ORDER BY id") == [("succeeded",)]


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30), ("2m", 120), ("1m30s", 90), ("1h", 3600), ("45", 45), ("1H2M", 3720)]
)
def test_every_reads_durations(text, seconds):
    assert parse_every(text).total_seconds() == seconds


@pytest.mark.parametrize("args", [["--every", "5x"], ["--every", "0s"], ["--every", "1m30"], ["--every", ""]])
def test_a_bad_every_is_one_line_and_exit_2(args):
    result = CliRunner().invoke(main, ["run", "--follow", *args])
    assert result.exit_code == EXIT_USAGE
    assert (
        result.stderr.count("\n") == 1 and "--every" in result.stderr and "write it like 30s" in result.stderr
    )


def test_every_without_follow_and_follow_with_auth_only_are_refused():
    for args in (["--every", "30s"], ["--follow", "--auth-only"]):
        result = CliRunner().invoke(main, ["run", *args])
        assert result.exit_code == EXIT_USAGE
        assert result.stderr.count("\n") == 1
