"""One production user as the admin API sees it: whether it can create it, the body it is sent, and what
it cannot carry."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sync.auth.columns import DEFAULT_AUD, DEFAULT_ROLE
from sync.auth.match import UserMatch, normal_email, normal_phone
from sync.auth.report import hash_problem

# The Auth server's request body cap (http.MaxBytesReader in its API middleware).
MAX_BODY_BYTES = 1_048_576
# The longest ban the server parses: Go's time.Duration tops out at 2^63-1 ns (about 292 years).
MAX_BAN_SECONDS = (2**63 - 1) // 1_000_000_000
# The format checks of the server's validateEmail (badoux/checkmail) and validatePhone (E.164 digits).
_EMAIL = re.compile(
    r"[a-zA-Z0-9.!#$%&'*+/=?^_`{|}~-]+@[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
    r"(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)*"
)
_PHONE = re.compile(r"[1-9][0-9]{1,14}")
# What the Auth server leaves of a soft-deleted user's contacts: a base64url SHA-256 (43 characters)
# for the e-mail, its first 15 characters for the phone.
_SCRAMBLED = re.compile(r"[A-Za-z0-9_-]{43}|[A-Za-z0-9_-]{15}")


def api_refusal(row: Mapping[str, Any], match: UserMatch) -> str | None:
    """Why the admin API cannot create this user, or None: the server would refuse it, or create it as
    a live account it is not."""
    if row["is_sso_user"]:
        return "SSO user: the admin API cannot create SSO users"
    if soft_deleted(row):
        return (
            "soft-deleted by the Auth server (scrambled e-mail and phone, no password): "
            "the admin API refuses it"
        )
    email = normal_email(row["email"]) if match.keep_email else None
    phone = normal_phone(row["phone"]) if match.keep_phone else None
    if not email and not phone:
        what = "anonymous user" if row["is_anonymous"] else "user"
        return f"{what} without e-mail or phone: the admin API cannot create it"
    if email and (len(email) > 255 or not _EMAIL.fullmatch(email)):
        return f"e-mail {email!r} fails the Auth server's format check: the admin API refuses it"
    if phone and not _PHONE.fullmatch(phone):
        return f"phone {phone!r} is not an E.164 number: the admin API refuses it"
    if hash_problem(row["encrypted_password"]):
        return "password hash in a format the admin API refuses"
    size = len(json.dumps(create_attributes(row, match)).encode())
    if size > MAX_BODY_BYTES:
        return f"its create body is {size:,} bytes, over the Auth server's {MAX_BODY_BYTES:,}-byte cap"
    return None


def soft_deleted(row: Mapping[str, Any]) -> bool:
    """A user the Auth server soft-deleted: deleted, no hash, its e-mail/phone replaced by scrambles."""
    if row["deleted_at"] is None or row["encrypted_password"]:
        return False
    contacts = [v for v in (row["email"], row["phone"]) if v]
    return bool(contacts) and all(_SCRAMBLED.fullmatch(v) and not _PHONE.fullmatch(v) for v in contacts)


def create_attributes(row: Mapping[str, Any], match: UserMatch) -> dict[str, Any]:
    """The ``create_user`` body for a source user: id, contacts, hash, confirmations, metadata, ban."""
    attributes: dict[str, Any] = {
        "id": str(row["id"]),
        # Always sent: without it the server answers "user_metadata": null, which the client cannot parse.
        "user_metadata": _json_object(row["raw_user_meta_data"]),
        "app_metadata": _json_object(row["raw_app_meta_data"]),
        "email_confirm": row["email_confirmed_at"] is not None,
        "phone_confirm": row["phone_confirmed_at"] is not None,
    }
    if match.keep_email and (email := normal_email(row["email"])):
        attributes["email"] = email
    if match.keep_phone and (phone := normal_phone(row["phone"])):
        attributes["phone"] = phone
    if row["encrypted_password"]:
        attributes["password_hash"] = row["encrypted_password"]
    if row["role"] and row["role"] != DEFAULT_ROLE:
        attributes["role"] = row["role"]
    if row["aud"] and row["aud"] != DEFAULT_AUD:
        attributes["aud"] = row["aud"]
    if (remaining := _ban_remaining(row)) >= 1:
        # Longer bans (e.g. until 'infinity') are capped at the longest the server parses; with the
        # target DSN the exact banned_until is written afterwards.
        attributes["ban_duration"] = f"{min(int(remaining), MAX_BAN_SECONDS)}s"
    return attributes


def _ban_remaining(row: Mapping[str, Any]) -> float:
    """Seconds of ban left (0 for none or an expired one)."""
    banned = row["banned_until"]
    if not banned:
        return 0.0
    if banned.year >= 9999:  # 'infinity' (and the far future) reads as the largest datetime
        return float(MAX_BAN_SECONDS)
    return max((banned - datetime.now(UTC)).total_seconds(), 0.0)


def _json_object(value: str | dict[str, Any] | None) -> dict[str, Any]:
    parsed = json.loads(value) if isinstance(value, str) else value
    return parsed if isinstance(parsed, dict) else {}


def uncarried(row: Mapping[str, Any], identities: Sequence[Mapping[str, Any]]) -> str:
    """What the admin API left out for this user, in words."""
    parts = ["original creation and sign-in times (set by the server)"]
    if row["email_confirmed_at"] or row["phone_confirmed_at"]:
        parts.append("confirmation times (set to the time of import)")
    oauth = sorted({i["provider"] for i in identities if i["provider"] not in ("email", "phone")})
    if oauth:
        parts.append(f"{', '.join(oauth)} identit{'y' if len(oauth) == 1 else 'ies'}")
    if _ban_remaining(row):
        parts.append("the exact banned_until (a ban duration from now instead)")
    if row["deleted_at"]:
        parts.append("deleted_at")
    return "the admin API could not carry: " + "; ".join(parts) + " (give the target DSN to write them)"
