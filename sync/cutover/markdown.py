"""The cutover report as Markdown a team lead pastes into the migration ticket.

Counts, table names, metric lines and the first keys of each problem: the same facts as the JSON
report, and like it never a password, hash, token or key.
"""

from __future__ import annotations

from sync.cutover import CutoverReport
from sync.verify import Check

SHOWN = 20
"""Keys listed per problem (the JSON report lists them all)."""


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    aligns = ["---", *["---:"] * (len(header) - 1)]
    return [line(header), "| " + " | ".join(aligns) + " |", *(line(r) for r in rows)]


def _problems(check: Check) -> list[str]:
    groups = {
        "missing on the target": check.missing,
        "different": [f"{d.key} ({', '.join(d.columns)})" for d in check.different],
        "only on the target, deleted in production": check.production_deletes,
        "quarantined, not landed": check.quarantined,
    }
    lines = []
    for problem, keys in groups.items():
        if keys:
            more = f" … and {len(keys) - SHOWN:,} more" if len(keys) > SHOWN else ""
            lines.append(f"- `{check.table}`: {len(keys):,} {problem}: {', '.join(keys[:SHOWN])}{more}")
    if check.orphans:
        lines.append(f"- `{check.table}`: {check.orphans:,} row(s) point at a parent the target lacks")
    return lines


def to_markdown(report: CutoverReport) -> str:
    """The whole report, ready to paste."""
    verdict = (
        "every metric met"
        if report.ok
        else f"{len(report.unmet())} metric(s) not met: {', '.join(report.unmet())}"
    )
    c = report.catch_up
    files = "" if c.files_copied is None else f" · {c.files_copied:,} files copied"
    out = [
        "# Cutover report",
        "",
        f"**Result: {verdict}.**",
        "",
        *_table(
            ["", ""],
            [
                ["production (source)", f"`{report.source}`"],
                ["target", f"`{report.target}`"],
                ["started", f"{report.started_at:%Y-%m-%d %H:%M:%S} UTC"],
                ["verified", f"{report.verified_at:%Y-%m-%d %H:%M:%S} UTC"],
                ["downtime (this command)", f"{report.downtime_seconds:.1f} s"],
            ],
        ),
        "",
        "## Success metrics",
        "",
        *_table(
            ["metric", "measured", "goal", "met"],
            [[m.name, m.measured, m.goal, "yes" if m.met else "**NO**"] for m in report.metrics],
        ),
        "",
        "## Final catch-up",
        "",
        f"Run {c.run_id}: {c.rows_written:,} rows written · {c.users_created:,} users created, "
        f"{c.users_updated:,} updated · {c.production_deletes:,} production deletes found{files} · "
        f"{c.quarantined:,} quarantined · {c.seconds:.1f} s.",
        "",
        "## Verification (everything production holds)",
        "",
        *_table(
            ["table", "in scope", "equal", "missing", "different", "prod. deleted", "quarantined", "orphans"],
            [
                [
                    f"`{k.table}`",
                    *(
                        f"{n:,}"
                        for n in (
                            k.in_scope,
                            k.equal,
                            len(k.missing),
                            len(k.different),
                            len(k.production_deletes),
                            len(k.quarantined),
                            k.orphans,
                        )
                    ),
                ]
                for k in report.verify.checks
            ],
        ),
    ]
    problems = [line for k in report.verify.checks for line in _problems(k)]
    if report.verify.sign_ins is not None and report.verify.sign_ins.cannot:
        cannot = report.verify.sign_ins.cannot
        more = f" … and {len(cannot) - SHOWN:,} more" if len(cannot) > SHOWN else ""
        problems.append(f"- cannot sign in on the target: {', '.join(cannot[:SHOWN])}{more}")
    if report.verify.files is not None:
        problems += [f"- file {example}" for example in report.verify.files.examples]
    if problems:
        out += ["", f"### Problems (first {SHOWN} keys each; the JSON report lists all)", "", *problems]
    return "\n".join(out) + "\n"
