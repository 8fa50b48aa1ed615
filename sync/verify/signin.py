"""``sync verify --check-password EMAIL``: would this password sign in on the target?

The Auth server's password grant, in its order (reference/supabase-auth.md §2.1–2.4): the user is found
by ``instance_id`` (the nil UUID), ``lower(email)``, ``aud`` and ``is_sso_user = false``, and must load
(no NULL where the server scans a string, a number or a time, in the user and its identities); then a
user without a password, a ban that has not ended, a password that does not match the hash and an
e-mail not confirmed each refuse the sign-in. ``GOTRUE_MAILER_AUTOCONFIRM`` confirms only at sign-up, so
no setting skips the confirmation here. ``deleted_at`` is not checked by the server: a soft delete
locks a user out by scrambling the e-mail and dropping the password, which the lookup and the password
checks meet. Reads the target only; the password is never printed or stored.
"""

from __future__ import annotations

from typing import Any

from sync.auth.columns import DEFAULT_AUD, STRING_COLUMNS
from sync.connect import Endpoint, connect
from sync.errors import EXIT_DIFFERENT, EXIT_FAILED, EXIT_OK, UsageError
from sync.models import Model
from sync.sqltext import ident
from sync.verify.passwords import Match, check_password

NIL = "00000000-0000-0000-0000-000000000000"

_NULL_STRINGS = ", ".join(f"CASE WHEN u.{ident(c)} IS NULL THEN '{c}' END" for c in STRING_COLUMNS)

# Every user with this e-mail however it is cased, with what decides whether the server finds and loads it.
_CANDIDATES = f"""
SELECT u.id::text AS id, u.aud, u.instance_id IS NOT DISTINCT FROM '{NIL}'::uuid AS nil_instance,
       u.is_sso_user, u.encrypted_password, u.banned_until, u.banned_until > now() AS banned,
       u.email_confirmed_at IS NOT NULL AS confirmed, u.deleted_at IS NOT NULL AS deleted,
       array_remove(ARRAY[{_NULL_STRINGS},
         CASE WHEN u.email_change_confirm_status IS NULL THEN 'email_change_confirm_status' END,
         CASE WHEN u.created_at IS NULL THEN 'created_at' END,
         CASE WHEN u.updated_at IS NULL THEN 'updated_at' END,
         CASE WHEN EXISTS (SELECT FROM auth.identities AS i WHERE i.user_id = u.id
                           AND (i.created_at IS NULL OR i.updated_at IS NULL))
              THEN 'auth.identities created_at/updated_at' END], NULL) AS nulls
FROM auth.users AS u WHERE lower(u.email) = $1 ORDER BY u.id
"""


class SignIn(Model):
    """The answer for one e-mail: whether the password would sign in, and why not."""

    email: str
    aud: str
    signs_in: bool
    reason: str
    """One sentence: what the Auth server would answer, and the cause."""
    user_id: str | None = None
    checked: bool = True
    """False when this tool could not tell (a hash kind it does not check)."""

    @property
    def exit_code(self) -> int:
        """0 it would sign in, 4 it would not, 1 this tool could not tell."""
        if not self.checked:
            return EXIT_FAILED
        return EXIT_OK if self.signs_in else EXIT_DIFFERENT


async def check_sign_in(target: Endpoint, email: str, password: str, aud: str = DEFAULT_AUD) -> SignIn:
    """Whether ``password`` would sign ``email`` in on ``target``'s Auth server (audience ``aud``)."""
    conn = await connect(target, application_name="sync verify")
    try:
        if not await conn.fetchval("SELECT to_regclass('auth.users') IS NOT NULL"):
            raise UsageError("The target has no auth schema: there is no Auth server user to sign in.")
        async with conn.transaction(readonly=True):
            # The server lower-cases the address in Go before it compares it with LOWER(email).
            rows = await conn.fetch(_CANDIDATES, email.lower())
    finally:
        await conn.close()
    return _judge(email, aud, password, rows)


def _judge(email: str, aud: str, password: str, rows: list[Any]) -> SignIn:
    """The answer, in the Auth server's order of checks, from the users :data:`_CANDIDATES` found."""

    def answer(signs_in: bool, reason: str, user: Any = None, *, checked: bool = True) -> SignIn:
        user_id = user["id"] if user is not None else None
        return SignIn(
            email=email, aud=aud, signs_in=signs_in, reason=reason, user_id=user_id, checked=checked
        )

    found = [r for r in rows if r["nil_instance"] and r["aud"] == aud and not r["is_sso_user"]]
    if not found:
        return answer(False, _not_found(rows, aud))
    if len(found) > 1:
        return answer(
            False,
            f"{len(found)} users have this e-mail (cased differently): the Auth server signs in whichever "
            "it reads first, so the answer is not fixed; keep one",
        )
    user = found[0]
    if user["nulls"]:
        return answer(
            False,
            f"the Auth server cannot load the user (500 'Database error querying schema'): NULL in "
            f"{', '.join(user['nulls'])}",
            user,
        )
    stored = user["encrypted_password"]
    if not stored:
        return answer(
            False, "the user has no password (400 invalid_credentials): OAuth or magic link only", user
        )
    if user["banned"]:
        return answer(
            False,
            f"the user is banned until {user['banned_until']:%Y-%m-%d %H:%M %Z} (400 user_banned)",
            user,
        )
    match, kind = check_password(stored, password)
    if match is Match.UNKNOWN:
        return answer(False, f"the target's hash ({kind}) {match}", user, checked=False)
    if match is not Match.YES:
        status = "500 unexpected_failure" if match is Match.BROKEN else "400 invalid_credentials"
        return answer(False, f"the password does not match the target's {kind} hash ({status})", user)
    if not user["confirmed"]:
        return answer(False, "the e-mail is not confirmed (400 email_not_confirmed)", user)
    deleted = (
        " (it is marked deleted, which the Auth server does not check at sign-in)" if user["deleted"] else ""
    )
    return answer(
        True, f"the password matches the target's {kind} hash and the user may sign in{deleted}", user
    )


def _not_found(rows: list[Any], aud: str) -> str:
    """Why the lookup finds nobody: no such e-mail, or what hides the user from the server."""
    if not rows:
        return "no user with this e-mail on the target (400 invalid_credentials)"
    user = rows[0]
    if not user["nil_instance"]:
        return "the user's instance_id is not the nil UUID, so the Auth server never finds it (400)"
    if user["is_sso_user"]:
        return "an SSO user: the Auth server's password sign-in does not look at SSO users (400)"
    return f"the user's aud is {user['aud']!r}, not {aud!r}: the Auth server does not find it (400)"


__all__ = ["SignIn", "check_sign_in"]
