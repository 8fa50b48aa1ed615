"""What the auth import did: the report ``sync run`` prints, and the notes it keeps about single users."""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from pydantic import Field, computed_field

from sync.auth.match import MatchKind, UserMatch
from sync.auth.options import AuthMode, ConflictPolicy, TriggerMode
from sync.errors import EXIT_OK, EXIT_QUARANTINED
from sync.models import Model

# The password hash formats the Auth server can check.
_BCRYPT_PREFIX = r"\$2[aby]?\$(?:0[4-9]|[12][0-9]|3[01])\$"
_BCRYPT_ALPHABET = "./A-Za-z0-9"
_BCRYPT = re.compile(_BCRYPT_PREFIX + f"[{_BCRYPT_ALPHABET}]{{53}}")
_ARGON2 = re.compile(r"\$argon2(?:i|id)\$v=19\$m=(\d+),t=(\d+),p=(\d+)\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+")
_FBSCRYPT = re.compile(
    r"\$fbscrypt\$v=1,n=(\d+),r=(\d+),p=(\d+)(?:,ss=[A-Za-z0-9+/]+=*)?(?:,sk=[A-Za-z0-9+/]+=*)?"
    r"\$[A-Za-z0-9+/]+=*\$[A-Za-z0-9+/]+=*"
)
# The Auth server's argon2 limits (m KiB, t passes, p lanes) and scrypt's cost exponent bound.
_ARGON2_LIMITS = (1_048_576, 20, 16)


def plain_hash_sql(value: str) -> str:
    """SQL true when the text ``value`` is empty or a bcrypt hash (:func:`hash_problem` has nothing to say).

    The prefix is one of the few strings the prefix pattern allows, looked up in a hashed list: a regular
    expression per row took most of the time of reading every user's keys. The 53 characters after it
    are matched apart, since a bounded repeat makes PostgreSQL's regular expressions five times slower and
    ``btrim`` or ``translate`` over the alphabet slower still. No ``$`` appears in the SQL (``\\x24`` in an
    escape string instead), as a ``$`` before a digit would read as a bound parameter where the query is
    inlined for COPY.
    """
    prefixes = ",".join(p.replace("$", "\\x24") for p in _bcrypt_prefixes())
    return (
        f"({value} = '' OR (left({value}, -53) = ANY (E'{{{prefixes}}}'::text[]) "
        f"AND right({value}, 53) ~ '^[{_BCRYPT_ALPHABET}]*$'))"
    )


def _bcrypt_prefixes() -> list[str]:
    """Every string :data:`_BCRYPT_PREFIX` matches: ``$2`` and a version letter or none, a two-digit cost."""
    candidates = (f"$2{v}${cost:02d}$" for v in ("", *string.ascii_lowercase) for cost in range(100))
    return [p for p in candidates if re.fullmatch(_BCRYPT_PREFIX, p)]


@dataclass(frozen=True, slots=True)
class UserNote:
    """Something about one user that could not be carried, or that the operator should know."""

    source_id: UUID
    target_id: UUID | None
    note: str


@dataclass(frozen=True, slots=True)
class QuarantinedUser:
    """A source user that did not land, with the reason (the database's message when it refused)."""

    source_id: UUID
    email: str | None
    error: str
    sqlstate: str | None = None


class AuthReport(Model):
    """What the auth import did: what ``sync run`` prints and ``--json`` emits."""

    mode: AuthMode
    policy: ConflictPolicy
    triggers: TriggerMode
    source_users: int = 0
    created: int = 0
    matched_by_id: int = 0
    matched_by_email: int = 0
    matched_by_phone: int = 0
    updated: int = 0
    unchanged: int = 0
    quarantined: int = 0
    identities_created: int = 0
    mapped: list[UserMatch] = Field(default_factory=list)
    quarantine: list[QuarantinedUser] = Field(default_factory=list)
    notes: list[UserNote] = Field(default_factory=list)
    not_copied: list[str] = Field(default_factory=list)
    seconds: float = 0.0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def users_per_second(self) -> float:
        return round(self.source_users / self.seconds, 1) if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """0 when every user landed, 3 when some were quarantined."""
        return EXIT_QUARANTINED if self.quarantined else EXIT_OK

    def summary(self, shown: int = 20) -> list[str]:
        """The report in a few lines of text, listing at most ``shown`` notes and quarantined users."""
        lines = [
            f"auth import ({self.mode}, {self.policy}, triggers {self.triggers}): {self.source_users:,} "
            f"production users in {self.seconds:.1f} s ({self.users_per_second:,.0f} users/s)",
            f"  created {self.created:,} · matched by id {self.matched_by_id:,}, by e-mail "
            f"{self.matched_by_email:,}, by phone {self.matched_by_phone:,} · updated {self.updated:,} "
            f"· unchanged {self.unchanged:,} · quarantined {self.quarantined:,}",
            f"  identities created {self.identities_created:,} (as production has them)",
        ]
        lines += [f"  not copied: {line}" for line in self.not_copied]
        sections = (
            ("Notes", [f"{n.source_id}: {n.note}" for n in self.notes]),
            (
                "Quarantined (see _sync.quarantine on the target)",
                [f"{q.source_id} ({q.email or 'no e-mail'}): {q.error}" for q in self.quarantine],
            ),
        )
        for title, items in sections:
            if items:
                lines.append(f"{title} ({len(items):,}):")
                lines += [f"  - {item}" for item in items[:shown]]
                if len(items) > shown:
                    lines.append(f"  … and {len(items) - shown:,} more (--json lists them all)")
        return lines


def hash_problem(value: str | None) -> str | None:
    """Why the Auth server cannot check this password hash, or None when it can (or there is none)."""
    if not value:
        return None
    if _BCRYPT.fullmatch(value):
        return None
    if (argon2 := _ARGON2.fullmatch(value)) is not None:
        if all(0 < int(v) <= limit for v, limit in zip(argon2.groups(), _ARGON2_LIMITS, strict=True)):
            return None
        return (
            "argon2 hash beyond the Auth server's limits (m <= 1048576, t <= 20, p <= 16): sign-in will fail"
        )
    if (
        (scrypt := _FBSCRYPT.fullmatch(value)) is not None
        and int(scrypt[1]) < 32
        and min(map(int, scrypt.groups())) > 0
    ):
        return None
    if value.lstrip().startswith("{"):
        return (
            "password hash encrypted by the source's Auth server: it decrypts on the target only with the "
            "same key id configured there"
        )
    return "password hash in a format the Auth server cannot check: password sign-in will fail"


def direct_notes(row: Mapping[str, Any], match: UserMatch) -> list[UserNote]:
    """What to tell about a user written by SQL: its match's reason, SSO, a hash the server cannot check."""
    notes = []
    if match.reason:
        notes.append(UserNote(row["id"], match.target_id, match.reason))
    if match.kind is MatchKind.NEW and row["is_sso_user"]:
        notes.append(
            UserNote(
                row["id"],
                match.target_id,
                "SSO user: signs in only if the target has the same SSO provider (sso_providers are not "
                "copied)",
            )
        )
    problem = hash_problem(row["encrypted_password"])
    if problem and match.kind is not MatchKind.QUARANTINED:
        notes.append(UserNote(row["id"], match.target_id, problem))
    return notes
