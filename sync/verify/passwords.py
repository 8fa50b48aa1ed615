"""Whether a password matches a stored ``auth.users.encrypted_password``, as the Auth server decides.

The server chooses by prefix (reference/supabase-auth.md §2.3): ``$argon2`` (argon2i or argon2id, v=19,
bounded parameters, no keyid/data), ``$fbscrypt`` (Firebase's modified scrypt, in the server's own
notation), anything else bcrypt. A malformed argon2 or fbscrypt value simply does not match; a value
bcrypt cannot parse makes the server answer 500. This tool checks bcrypt, argon2id and fbscrypt; for
argon2i and database-encrypted values it says it cannot tell.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from enum import StrEnum

import bcrypt


class Match(StrEnum):
    """What the Auth server would make of a password against a stored hash."""

    YES = "matches"
    NO = "does not match"
    BROKEN = "is in no format the Auth server reads (it answers 500 unexpected_failure)"
    UNKNOWN = "cannot be checked by this tool"


_ARGON2 = re.compile(
    r"\$(?P<alg>argon2(?:d|i|id))\$v=(?P<v>16|19)\$m=(?P<m>\d+),t=(?P<t>\d+),p=(?P<p>\d+)"
    r"(?:,keyid=(?P<keyid>[^,$]+))?(?:,data=(?P<data>[^$]+))?\$(?P<salt>[^$]*)\$(?P<hash>.*)"
)
_FBSCRYPT = re.compile(
    r"\$fbscrypt\$v=(?P<v>\d+),n=(?P<n>\d+),r=(?P<r>\d+),p=(?P<p>\d+)(?:,ss=(?P<ss>[^,]+))?"
    r"(?:,sk=(?P<sk>[^$]+))?\$(?P<salt>[^$]+)\$(?P<hash>.+)"
)
BCRYPT_MAX_BYTES = 72
"""bcrypt reads no more of a password; the Auth server's comparison ignores the rest."""


def check_password(stored: str, password: str) -> tuple[Match, str]:
    """How ``password`` fares against ``stored`` (never empty), with the hash's kind in words."""
    secret = password.encode()
    if stored.startswith("$argon2"):
        return _argon2(stored, secret)
    if stored.startswith("$fbscrypt"):
        return _fbscrypt(stored, secret), "fbscrypt"
    if stored.lstrip().startswith("{"):
        return Match.UNKNOWN, "encrypted by the Auth server's database key"
    try:
        matched = bcrypt.checkpw(secret[:BCRYPT_MAX_BYTES], stored.encode())
    except ValueError:
        return Match.BROKEN, "not bcrypt, argon2 or fbscrypt"
    return (Match.YES if matched else Match.NO), "bcrypt"


def _b64(text: str, *, padded: bool) -> bytes:
    """Standard base64; unpadded (argon2's PHC form) or padded (fbscrypt). ValueError when it is not."""
    if not padded:
        text += "=" * (-len(text) % 4)
    return base64.b64decode(text, validate=True)


def _argon2(stored: str, secret: bytes) -> tuple[Match, str]:
    parts = _ARGON2.fullmatch(stored)
    if parts is None:
        return Match.NO, "argon2 (malformed)"
    alg = parts["alg"]
    if alg == "argon2d" or parts["v"] != "19" or parts["keyid"] or parts["data"]:
        return Match.NO, f"{alg} (parameters the Auth server refuses)"
    memory, rounds, lanes = int(parts["m"]), int(parts["t"]), int(parts["p"])
    if memory > 1024 * 1024 or rounds > 20 or lanes > 16:
        return Match.NO, f"{alg} (over the Auth server's limits)"
    try:
        salt, expected = _b64(parts["salt"], padded=False), _b64(parts["hash"], padded=False)
    except (ValueError, binascii.Error):
        return Match.NO, f"{alg} (malformed base64)"
    if not salt or not expected:
        return Match.NO, f"{alg} (empty salt or hash)"
    if alg == "argon2i":
        return Match.UNKNOWN, alg
    try:
        from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

        derived = Argon2id(
            salt=salt,
            length=len(expected),
            iterations=rounds,
            lanes=lanes,
            memory_cost=max(memory, 8 * lanes),  # the server's library raises a smaller one likewise
        ).derive(secret)
    except (ImportError, ValueError):
        return Match.UNKNOWN, alg
    return (Match.YES if hmac.compare_digest(derived, expected) else Match.NO), alg


def _fbscrypt(stored: str, secret: bytes) -> Match:
    parts = _FBSCRYPT.fullmatch(stored)
    if parts is None or parts["v"] != "1":
        return Match.NO
    power, block, parallel = int(parts["n"]), int(parts["r"]), int(parts["p"])
    if not (power and block and parallel):
        return Match.NO
    try:
        salt, expected = _b64(parts["salt"], padded=True), _b64(parts["hash"], padded=True)
        separator, signer = _b64(parts["ss"] or "", padded=True), _b64(parts["sk"] or "", padded=True)
    except (ValueError, binascii.Error):
        return Match.NO
    try:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    except ImportError:
        return Match.UNKNOWN
    cost = 1 << power
    key = hashlib.scrypt(
        secret,
        salt=salt + separator,
        n=cost,
        r=block,
        p=parallel,
        dklen=32,
        maxmem=128 * block * (cost + parallel + 2) + (1 << 20),
    )
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    derived = encryptor.update(signer) + encryptor.finalize()
    return Match.YES if hmac.compare_digest(derived, expected) else Match.NO
