"""`sync cutover`: the final catch-up, verify and the success metrics, exit 0 only when all hold."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import types
import uuid
from pathlib import Path

from click.testing import CliRunner
from queries import execute, fetch, seed_command, seed_run_args
from unchanged import unchanged

import sync.cutover as sync_cutover
from devkit import scenario
from sync.auth.columns import TOKEN_COLUMNS
from sync.cli import main
from sync.cli.cutover import MAINTENANCE_REFUSED
from sync.cutover import CutoverReport
from sync.errors import EXIT_DIFFERENT, EXIT_OK, EXIT_USAGE
from tests.storage_api_server import StorageApiServer

ROOT = Path(__file__).resolve().parent.parent


def cutover_args(source, target, *extra: str) -> list[str]:
    return seed_command("cutover", source, target, *extra)


def sync(source, target) -> None:
    result = CliRunner().invoke(main, seed_run_args(source, target, "--quiet"))
    assert result.exit_code == EXIT_OK, result.output


def metrics(report: CutoverReport) -> dict[str, tuple[str, bool]]:
    return {m.name: (m.measured, m.met) for m in report.metrics}


def test_a_cutover_after_a_good_run_catches_up_verifies_and_meets_every_metric(
    seed_dbs, tmp_path: Path, monkeypatch
) -> None:
    source, target = seed_dbs
    sync(source, target)
    # The command's clock says 2.2503 s from start to verified: a figure whose tenth depends on whether
    # it was first rounded to the millisecond, as the report stores it.
    ticks = iter((100.0, 102.2503))
    monkeypatch.setattr(sync_cutover, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    # Production keeps going until maintenance mode: a new request of an old user, an edit without
    # updated_at.
    (user,) = fetch(source.url, "SELECT id::text FROM public.profiles ORDER BY created_at LIMIT 1")[0]
    execute(
        source.url,
        "INSERT INTO public.financing_requests (profile_id, amount, term_months, status) "
        "VALUES (%s, 150000, 12, 'submitted')",
        user,
    )
    execute(
        source.url,
        "UPDATE public.bank_profiles SET bank_name = 'HSBC' "
        "WHERE id = (SELECT min(id) FROM public.bank_profiles)",
    )

    result = CliRunner().invoke(
        main, cutover_args(source, target, "--yes", "--report", str(tmp_path / "c.json"))
    )

    assert result.exit_code == EXIT_OK, result.output
    report = CutoverReport.model_validate_json((tmp_path / "c.json").read_text())
    assert report.ok and report.catch_up.rows_written >= 2
    found = metrics(report)
    signing_in = fetch(
        source.url,
        "SELECT count(*) FROM auth.users WHERE encrypted_password <> '' AND email_confirmed_at IS NOT NULL "
        "AND confirmation_token IS NOT NULL AND (banned_until IS NULL OR banned_until < now())",
    )[0][0]
    assert signing_in > 3500
    assert report.verify.sign_ins is not None and report.verify.sign_ins.production >= signing_in
    assert found["users who can sign in on the target"] == (
        f"{report.verify.sign_ins.production:,} of {report.verify.sign_ins.production:,}",
        True,
    )
    assert found["rows lost"][1] and found["rows lost"][0].startswith("0 of ")
    assert found["quarantined"] == ("0", True)
    assert report.downtime_seconds == 2.25 and found["downtime"] == ("2.2 s", True)
    assert (
        "Cutover: success metrics" in result.output and "cutover verified: every metric met" in result.output
    )
    markdown = (tmp_path / "c.md").read_text()
    assert (
        "**Result: every metric met.**" in markdown and "| users who can sign in on the target |" in markdown
    )


def test_a_cutover_with_a_row_missing_and_a_row_different_fails_and_names_them(seed_dbs, tmp_path: Path):
    source, target = seed_dbs
    sync(source, target)
    (gone,) = fetch(
        target.url,
        "SELECT max(id)::text FROM public.bank_profiles WHERE id < 1000000 AND created_at < '2024-11-01'",
    )[0]
    execute(target.url, "DELETE FROM public.bank_profiles WHERE id = %s::bigint", gone)
    (edited,) = fetch(source.url, "SELECT id::text FROM public.profiles ORDER BY created_at LIMIT 1")[0]
    execute(target.url, "UPDATE public.profiles SET display_name = 'someone else' WHERE id = %s", edited)

    result = CliRunner().invoke(
        main, cutover_args(source, target, "--yes", "--report", str(tmp_path / "c.json"))
    )

    assert result.exit_code == EXIT_DIFFERENT, result.output
    assert f"public.bank_profiles: 1 missing on the target: {gone}" in result.output
    assert f"public.profiles: 1 different: {edited} (display_name)" in result.output
    assert "cutover NOT verified (exit 4): rows lost" in result.output
    report = CutoverReport.model_validate_json((tmp_path / "c.json").read_text())
    assert metrics(report)["rows lost"][1] is False and metrics(report)["rows lost"][0].startswith("2 of ")
    assert f"{gone}" in (tmp_path / "c.md").read_text()


def test_a_user_banned_on_the_target_only_cannot_sign_in_there_and_fails_the_cutover(seed_dbs):
    source, target = seed_dbs
    sync(source, target)
    (user,) = fetch(
        source.url,
        "SELECT id::text FROM auth.users WHERE email_confirmed_at IS NOT NULL AND encrypted_password <> '' "
        "AND confirmation_token IS NOT NULL AND banned_until IS NULL ORDER BY id LIMIT 1",
    )[0]
    execute(target.url, "UPDATE auth.users SET banned_until = now() + interval '1 day' WHERE id = %s", user)

    result = CliRunner().invoke(main, cutover_args(source, target, "--yes"))

    assert result.exit_code == EXIT_DIFFERENT, result.output
    assert f"cannot sign in on the target: {user}" in result.output
    assert "users who can sign in on the target" in result.output.split("cutover NOT verified")[1]


def test_without_yes_and_without_a_terminal_the_cutover_is_refused_and_writes_nothing(seed_dbs):
    source, target = seed_dbs
    sync(source, target)
    execute(
        source.url,
        "UPDATE public.profiles SET full_name = 'changed' "
        "WHERE id = (SELECT id FROM public.profiles ORDER BY id LIMIT 1)",
    )
    with unchanged(source, target):
        result = CliRunner().invoke(main, cutover_args(source, target))
    assert result.exit_code == EXIT_USAGE
    assert result.stderr.strip().splitlines() == [f"error: {MAINTENANCE_REFUSED}"]


def test_a_report_path_that_cannot_be_written_is_refused_before_anything_runs(seed_dbs, tmp_path: Path):
    source, target = seed_dbs
    with unchanged(target):
        result = CliRunner().invoke(
            main, cutover_args(source, target, "--yes", "--report", str(tmp_path / "nowhere" / "c.json"))
        )
    assert result.exit_code == EXIT_USAGE and "does not exist" in result.output


async def _cli(*args: str) -> tuple[int, str]:
    """``python -m sync ARGS`` in a process of its own (the tests' Storage APIs keep serving meanwhile)."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sync",
        *args,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await child.communicate()
    return child.returncode or 0, out.decode()


async def test_the_reports_and_verify_json_hold_no_hash_token_or_key(
    seed_dbs, seed: scenario.Scenario, tmp_path: Path
):
    source, target = seed_dbs
    tokens = ", ".join(f"{c} = 'tok-{c}-' || md5(id::text)" for c in TOKEN_COLUMNS)
    execute(
        source.url,
        f"UPDATE auth.users SET {tokens} WHERE id IN (SELECT id FROM auth.users ORDER BY id LIMIT 40)",
    )
    keys = {
        "source": f"prod-service-role-{uuid.uuid4().hex}",
        "target": f"dev-service-role-{uuid.uuid4().hex}",
    }
    data = seed
    async with (
        StorageApiServer(source.url, tmp_path / "production", keys["source"]) as prod_api,
        StorageApiServer(target.url, tmp_path / "development", keys["target"]) as dev_api,
    ):
        await scenario.upload_files(prod_api.url, keys["source"], scenario.document_files(data.production))
        files = [
            "--source-supabase-url",
            prod_api.url,
            "--source-service-role-key",
            keys["source"],
            "--supabase-url",
            dev_api.url,
            "--service-role-key",
            keys["target"],
        ]
        code, out = await _cli(*seed_run_args(source, target, "--quiet", *files))
        assert code == EXIT_OK, out
        report = tmp_path / "cutover.json"
        code, cut = await _cli(*cutover_args(source, target, "--yes", "--report", str(report), *files))
        assert code == EXIT_OK, cut
        code, verified = await _cli(*seed_command("verify", source, target, "--json"))
        assert code == EXIT_OK, verified

    parsed = CutoverReport.model_validate_json(report.read_text())
    assert parsed.verify.files is not None and parsed.verify.files.objects > 400
    assert dict((m.name, m.met) for m in parsed.metrics)["files"] is True
    secrets = set(keys.values())
    for db in (source, target):
        secrets |= {
            r[0]
            for r in fetch(db.url, "SELECT encrypted_password FROM auth.users WHERE encrypted_password <> ''")
        }
        for column in TOKEN_COLUMNS:
            secrets |= {r[0] for r in fetch(db.url, f"SELECT {column} FROM auth.users WHERE {column} <> ''")}
    assert len([s for s in secrets if s.startswith("$2")]) > 900  # the scenario draws from 997 passwords
    assert len([s for s in secrets if s.startswith("tok-")]) == 40 * len(TOKEN_COLUMNS)
    texts = {
        "JSON report": report.read_text(),
        "Markdown report": report.with_suffix(".md").read_text(),
        "verify --json": verified,
        "cutover output": cut,
    }
    json.loads(texts["verify --json"])
    leaked = {name: [s for s in secrets if s in text][:3] for name, text in texts.items()}
    assert leaked == {name: [] for name in texts}
