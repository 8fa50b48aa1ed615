"""`sync verify --check-password EMAIL` says whether a password would sign in on the target, as the Auth
server decides (found by e-mail and audience, loadable, a password, not banned, the hash, confirmed),
and never shows the password."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner, Result
from queries import execute, fetch, seed_run_args

from devkit.scenario import password_for
from sync.cli import main
from sync.errors import EXIT_DIFFERENT, EXIT_OK, EXIT_USAGE

# A user of the development copy that came from production (not a tester), who may sign in today.
SIGNS_IN = (
    "email IS NOT NULL AND email NOT LIKE '%%@ultima.dev' AND encrypted_password LIKE '$2%%' "
    "AND email_confirmed_at IS NOT NULL AND banned_until IS NULL AND NOT is_sso_user"
)

# Firebase's published example of its modified scrypt, in the Auth server's $fbscrypt notation.
FBSCRYPT = (
    "$fbscrypt$v=1,n=14,r=8,p=1,ss=Bw==,sk=jxspr8Ki0RYycVU8zykbdLGjFQ3McFUH0uiiTvC8pVMXAn210wjLNmdZJzxUECKbm0Qs"
    "EmYUSDzZvpjeJ9WmXA==$42xEC+ixf3L2lw==$lSrfV15cpx95/sZS2W9c9Kp6i/LVgQNDNC/qzrCnh1SAyZvqmZqAjTdn3aoItz+VHjoZ"
    "ilo78198JAdRuid5lQ=="
)


def check(target, email: str, password: str, *extra: str) -> Result:
    """`sync verify --check-password` with the password piped on stdin; it never appears in the output."""
    result = CliRunner().invoke(
        main, ["verify", "--target", target.url, "--check-password", email, *extra], input=f"{password}\n"
    )
    assert password not in result.output
    return result


def a_user(target, where: str = "true") -> tuple[str, str]:
    """A development-copy user who can sign in (picked further by ``where``): id and e-mail."""
    return fetch(
        target.url, f"SELECT id::text, email FROM auth.users WHERE {SIGNS_IN} AND {where} ORDER BY id"
    )[0]


def refused_after(target, change: str) -> tuple[str, str]:
    """A user's own password after ``change`` (SQL setting auth.users columns): the line, and the e-mail."""
    user, email = a_user(target)
    execute(target.url, f"UPDATE auth.users SET {change} WHERE id = %s", user)
    result = check(target, email, password_for(email))
    assert result.exit_code == EXIT_DIFFERENT, result.output
    return result.stdout, email


@pytest.fixture
def target(seed_dbs):
    return seed_dbs[1]


def test_a_production_users_password_signs_in_on_the_target_after_a_run_and_a_wrong_one_does_not(seed_dbs):
    source, target = seed_dbs
    (email,) = fetch(
        source.url,
        f"SELECT email FROM auth.users WHERE {SIGNS_IN} AND created_at >= '2024-11-18' ORDER BY id",
    )[0]
    assert check(target, email, password_for(email)).exit_code == EXIT_DIFFERENT  # not there yet
    ran = CliRunner().invoke(main, seed_run_args(source, target, "--quiet"))
    assert ran.exit_code == 0, ran.output

    right = check(target, email.upper(), password_for(email))  # the server lower-cases the address
    assert right.exit_code == EXIT_OK, right.output
    assert right.stdout.startswith(f"yes: {email.upper()} would sign in on the target: the password matches")
    assert right.stdout.count("\n") == 1

    wrong = check(target, email, "not-" + password_for(email))
    assert wrong.exit_code == EXIT_DIFFERENT
    assert wrong.stdout == (
        f"no: {email} would not sign in on the target: the password does not match the target's bcrypt hash "
        "(400 invalid_credentials).\n"
    )


def test_an_unknown_email_is_named(target):
    result = check(target, "nobody-at-all@example.com", "whatever-it-is")
    assert result.exit_code == EXIT_DIFFERENT
    assert "no user with this e-mail on the target (400 invalid_credentials)" in result.stdout


def test_a_banned_user_is_refused_even_with_the_right_password(target):
    line, email = refused_after(target, "banned_until = now() + interval '1 day'")
    assert "the user is banned until" in line and "(400 user_banned)" in line
    # A ban that has ended no longer counts.
    execute(
        target.url, "UPDATE auth.users SET banned_until = now() - interval '1 day' WHERE email = %s", email
    )
    assert check(target, email, password_for(email)).exit_code == EXIT_OK


def test_an_unconfirmed_user_is_refused_and_the_hash_is_checked_first(target):
    line, email = refused_after(target, "email_confirmed_at = NULL")
    assert "the e-mail is not confirmed (400 email_not_confirmed)" in line
    # The server compares the password before the confirmation: a wrong one is invalid credentials.
    wrong = check(target, email, "not-" + password_for(email))
    assert "the password does not match" in wrong.stdout and "not confirmed" not in wrong.stdout


def test_a_user_the_server_cannot_find_or_load_is_named_with_the_cause(target):
    line, _ = refused_after(target, "recovery_token = NULL")
    assert "cannot load the user (500 'Database error querying schema'): NULL in recovery_token" in line

    line, email = refused_after(target, "recovery_token = '', aud = 'other'")
    assert "the user's aud is 'other', not 'authenticated'" in line
    assert check(target, email, password_for(email), "--aud", "other").exit_code == EXIT_OK


def test_a_user_without_a_password_is_refused(target):
    line, _ = refused_after(target, "encrypted_password = ''")
    assert "the user has no password (400 invalid_credentials)" in line


def test_fbscrypt_and_argon2id_hashes_are_checked_as_the_server_does(target):
    from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

    user, email = a_user(target)
    execute(target.url, "UPDATE auth.users SET encrypted_password = %s WHERE id = %s", FBSCRYPT, user)
    assert check(target, email, "user1password").exit_code == EXIT_OK
    assert "fbscrypt hash" in check(target, email, "user2password").stdout

    argon2 = Argon2id(salt=b"sixteen byte sal", length=32, iterations=2, lanes=1, memory_cost=1024)
    execute(
        target.url,
        "UPDATE auth.users SET encrypted_password = %s WHERE id = %s",
        argon2.derive_phc_encoded(b"an argon2 password"),
        user,
    )
    assert check(target, email, "an argon2 password").exit_code == EXIT_OK
    assert check(target, email, "another password").exit_code == EXIT_DIFFERENT


def test_json_answers_without_the_password_and_an_empty_email_is_a_usage_error(target):
    _, email = a_user(target)
    result = check(target, email, password_for(email), "--json")
    assert result.exit_code == EXIT_OK
    assert json.loads(result.stdout)["signs_in"] is True
    empty = check(target, " ", "whatever-it-is")
    assert empty.exit_code == EXIT_USAGE and empty.stderr.count("\n") == 1
