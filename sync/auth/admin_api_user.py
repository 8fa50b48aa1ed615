"""One production user as the admin API sees it: whether it can create it, the body it is sent, and what
it cannot carry."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sync.auth.columns import DEFAULT_AUD, DEFAULT_ROLE
from sync.auth.match import UserMatch, normal_email, normal_phone
from sync.auth.report import hash_problem


def api_refusal(row: Mapping[str, Any], match: UserMatch) -> str | None:
    """Why the admin API cannot create this user at all, or None."""
    if row["is_sso_user"]:
        return "SSO user: the admin API cannot create SSO users"
    email = normal_email(row["email"]) if match.keep_email else None
    phone = normal_phone(row["phone"]) if match.keep_phone else None
    if not email and not phone:
        what = "anonymous user" if row["is_anonymous"] else "user"
        return f"{what} without e-mail or phone: the admin API cannot create it"
    if hash_problem(row["encrypted_password"]):
        return "password hash in a format the admin API refuses"
    return None


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
        attributes["ban_duration"] = f"{int(remaining)}s"
    return attributes


def _ban_remaining(row: Mapping[str, Any]) -> float:
    """Seconds of ban left (0 for none or an expired one)."""
    banned = row["banned_until"]
    return max((banned - datetime.now(UTC)).total_seconds(), 0.0) if banned else 0.0


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
