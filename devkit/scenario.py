"""The seed scenario, generated: a production database and the development copy whose schema moved on.

The story (see README): on 2024-11-18 production was copied to a development database. For a
month both lived on: production gained ~2,950 users and their requests, bank profiles and documents
and edited older rows; development got its new schema plus test rows, whose integer keys collide with
production's new rows because both sides kept drawing from the same sequences, and a few testers
signed up again in development with the e-mail of a production user.

Everything is drawn from one seeded RNG, so the same seed and scale give the same rows (and the same
checksums). At scale 1 the counts are the seed document's exactly; ``scale`` multiplies them all.

Passwords are reproducible from the e-mail (:func:`password_for`), so tests can sign users in.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import random
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import aiohttp
import bcrypt
import psycopg
from psycopg.types.json import Jsonb

from devkit import SQL_DIR

COPY_DATE = datetime(2024, 11, 18, tzinfo=UTC)
"""The day production was copied to development."""
PROPOSAL_DATE = datetime(2024, 12, 18, tzinfo=UTC)
"""The day the seed's proposal was written: the end of the scenario's month."""
HISTORY_START = datetime(2023, 1, 9, tzinfo=UTC)
NIL_UUID = uuid.UUID(int=0)
DEFAULT_SEED = 20241218

# Per scale unit. Development's users are the pre-copy users plus testers and re-registered people.
PROD_USERS = 4082
PRE_COPY_USERS = 1125
DEV_REREGISTERED = 5
DEV_TESTERS = 3
PROD = {"financing_requests": 2092, "bank_profiles": 1376, "documents": 1004}
DEV = {"financing_requests": 883, "bank_profiles": 442, "documents": 548}
DEV_TEST_ROWS = {"financing_requests": 12, "bank_profiles": 6, "documents": 8}
DEV_NOTIFICATIONS = 40
COST10_USERS = 5
SOFT_DELETED_USERS = 3

APP_TABLES = ("profiles", "financing_requests", "bank_profiles", "documents")
TERMS = (6, 12, 18, 24, 36, 48)
STATUSES = ("draft", "submitted", "approved", "rejected")
BANKS = ("BBVA", "Banorte", "Santander", "Banamex", "HSBC", "Scotiabank", "Inbursa")
DOC_KINDS = ("ine", "comprobante_domicilio", "estado_cuenta", "rfc", "nomina")
PURPOSES = ("capital de trabajo", "compra de auto", "remodelación", "consolidar deudas", "equipo", None)
FIRST = (
    "María",
    "José",
    "Juan",
    "Ana",
    "Luis",
    "Carmen",
    "Jorge",
    "Sofía",
    "Diego",
    "Lucía",
    "Pedro",
    "Valeria",
    "Miguel",
    "Fernanda",
    "Carlos",
    "Daniela",
    "Ricardo",
    "Paola",
    "Andrés",
    "Gabriela",
)
LAST = (
    "García",
    "Hernández",
    "López",
    "Martínez",
    "González",
    "Pérez",
    "Rodríguez",
    "Sánchez",
    "Ramírez",
    "Torres",
    "Flores",
    "Rivera",
    "Gómez",
    "Díaz",
    "Morales",
    "Reyes",
    "Cruz",
    "Ortiz",
    "Ruiz",
    "Vargas",
)
DOMAINS = ("gmail.com", "hotmail.com", "outlook.com", "yahoo.com.mx", "icloud.com", "prodigy.net.mx")
TAGS = ("pyme", "persona_fisica", "recurrente", "referido", "vip", "nuevo")

USER_COLUMNS = (
    "instance_id",
    "id",
    "aud",
    "role",
    "email",
    "encrypted_password",
    "email_confirmed_at",
    "invited_at",
    "confirmation_token",
    "confirmation_sent_at",
    "recovery_token",
    "recovery_sent_at",
    "email_change_token_new",
    "email_change",
    "email_change_sent_at",
    "last_sign_in_at",
    "raw_app_meta_data",
    "raw_user_meta_data",
    "is_super_admin",
    "created_at",
    "updated_at",
    "phone",
    "phone_confirmed_at",
    "phone_change",
    "phone_change_token",
    "phone_change_sent_at",
    "email_change_token_current",
    "email_change_confirm_status",
    "banned_until",
    "reauthentication_token",
    "reauthentication_sent_at",
    "is_sso_user",
    "deleted_at",
    "is_anonymous",
)
IDENTITY_COLUMNS = (
    "id",
    "provider_id",
    "user_id",
    "identity_data",
    "provider",
    "last_sign_in_at",
    "created_at",
    "updated_at",
)
PROFILE_COLUMNS = ("id", "email", "full_name", "phone", "tags", "preferences", "created_at", "updated_at")
REQUEST_COLUMNS = (
    "id",
    "profile_id",
    "amount",
    "term_months",
    "status",
    "purpose",
    "details",
    "created_at",
    "updated_at",
)
BANK_COLUMNS = (
    "id",
    "profile_id",
    "bank_name",
    "account_type",
    "clabe",
    "monthly_income",
    "created_at",
    "updated_at",
)
DOCUMENT_COLUMNS = (
    "id",
    "request_id",
    "profile_id",
    "kind",
    "storage_path",
    "size_bytes",
    "created_at",
    "updated_at",
)


def password_for(email: str) -> str:
    """The password of the scenario's user with this e-mail, on the side where the user was created.

    ``Ultima-NNN!`` where NNN is the first 8 hex digits of sha256(lower-cased e-mail) modulo 997.
    Development's re-registered testers chose another password: :func:`dev_password_for`.
    """
    bucket = int(hashlib.sha256(email.strip().lower().encode()).hexdigest()[:8], 16) % 997
    return f"Ultima-{bucket:03d}!"


def dev_password_for(email: str) -> str:
    """The password a tester chose when signing up again in development."""
    return "dev-" + password_for(email)


@dataclass
class Side:
    """The rows of one database, table by table, in load order."""

    users: list[dict[str, Any]] = field(default_factory=list)
    identities: list[dict[str, Any]] = field(default_factory=list)
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {t: [] for t in APP_TABLES})


@dataclass
class Scenario:
    """Both databases' rows, plus the facts tests check against."""

    production: Side
    development: Side
    pre_copy_production: Side
    dev_only: Side
    reregistered_emails: list[str]
    edited: dict[str, set[Any]]
    scale: int
    soft_deleted: list[uuid.UUID] = field(default_factory=list)
    """Production users created after the copy that the Auth server soft-deleted; their rows stay."""


class _Hasher:
    """bcrypt hashes at cost 4, one per distinct password (salted once, shared by its users).

    Salts are drawn from the scenario's RNG, not the OS's, so the same seed gives the same hashes.
    """

    ALPHABET = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

    def __init__(self, rng: random.Random) -> None:
        self.cache: dict[str, str] = {}
        self.rng = rng

    def salt(self, cost: int) -> bytes:
        body = "".join(self.rng.choice(self.ALPHABET) for _ in range(21)) + self.rng.choice(".Oeu")
        return f"$2b${cost:02d}${body}".encode()

    def hash(self, password: str, cost: int = 4) -> str:
        if cost != 4:
            return bcrypt.hashpw(password.encode(), self.salt(cost)).decode()
        if password not in self.cache:
            self.cache[password] = bcrypt.hashpw(password.encode(), self.salt(4)).decode()
        return self.cache[password]


class _Generator:
    def __init__(self, seed: int, scale: int) -> None:
        self.rng = random.Random(seed)
        self.scale = scale
        self.hasher = _Hasher(self.rng)
        self.ids: dict[str, int] = {t: 0 for t in APP_TABLES}

    def uuid(self) -> uuid.UUID:
        return uuid.UUID(int=self.rng.getrandbits(128), version=4)

    def moment(self, start: datetime, end: datetime) -> datetime:
        span = (end - start).total_seconds()
        return (start + timedelta(seconds=self.rng.random() * span)).replace(microsecond=0)

    def user(
        self,
        n: int,
        created: datetime,
        *,
        email: str | None = None,
        password: str | None = None,
        cost: int = 4,
    ) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
        rng = self.rng
        first, last = rng.choice(FIRST), rng.choice(LAST)
        anonymous = email is None and rng.random() < 0.0006
        if email is None and not anonymous:
            local = f"{first}.{last}".lower().translate(str.maketrans("áéíóúñ", "aeioun"))
            email = f"{local}{n}@{rng.choice(DOMAINS)}"
        user_id = self.uuid()
        confirmed = (
            None if anonymous or rng.random() < 0.03 else created + timedelta(minutes=rng.randint(1, 90))
        )
        phone = f"52155{n:08d}" if not anonymous and rng.random() < 0.2 else None
        google = not anonymous and rng.random() < 0.08
        providers = ["email"] + (["google"] if google else []) + (["phone"] if phone else [])
        legacy_nulls = rng.random() < 0.01  # rows an early import tool wrote with NULL tokens
        token = None if legacy_nulls else ""
        signed_in = created + timedelta(days=rng.randint(0, 20), seconds=rng.randint(0, 86400))
        user = {
            "instance_id": NIL_UUID,
            "id": user_id,
            "aud": "authenticated",
            "role": "authenticated",
            "email": email,
            "encrypted_password": None
            if anonymous
            else self.hasher.hash(password or password_for(email), cost),
            "email_confirmed_at": confirmed,
            "invited_at": None,
            "confirmation_token": token,
            "confirmation_sent_at": None if anonymous else created,
            "recovery_token": token,
            "recovery_sent_at": None,
            "email_change_token_new": token,
            "email_change": token,
            "email_change_sent_at": None,
            "last_sign_in_at": signed_in,
            "raw_app_meta_data": {
                "provider": "anonymous" if anonymous else "email",
                "providers": [] if anonymous else providers,
            },
            "raw_user_meta_data": {} if anonymous else {"full_name": f"{first} {last}"},
            "is_super_admin": None,
            "created_at": created,
            "updated_at": signed_in,
            "phone": phone,
            "phone_confirmed_at": created if phone else None,
            "phone_change": "",
            "phone_change_token": "",
            "phone_change_sent_at": None,
            "email_change_token_current": token,
            "email_change_confirm_status": 0,
            "banned_until": PROPOSAL_DATE + timedelta(days=365) if rng.random() < 0.001 else None,
            "reauthentication_token": "",
            "reauthentication_sent_at": None,
            "is_sso_user": False,
            "deleted_at": None,
            "is_anonymous": anonymous,
        }
        identities = []
        if email and rng.random() >= 0.01:  # a few early users never got their email identity backfilled
            identities.append(
                self.identity(
                    user_id,
                    "email",
                    str(user_id),
                    {
                        "sub": str(user_id),
                        "email": email.lower(),
                        "email_verified": confirmed is not None,
                        "phone_verified": False,
                    },
                    created,
                    signed_in,
                )
            )
        if phone:
            identities.append(
                self.identity(
                    user_id,
                    "phone",
                    str(user_id),
                    {"sub": str(user_id), "phone": phone, "email_verified": False, "phone_verified": True},
                    created,
                    signed_in,
                )
            )
        if google:
            subject = str(rng.randrange(10**20, 10**21))
            identities.append(
                self.identity(
                    user_id,
                    "google",
                    subject,
                    {
                        "iss": "https://accounts.google.com",
                        "sub": subject,
                        "email": email.lower(),
                        "email_verified": True,
                        "phone_verified": False,
                        "name": f"{first} {last}",
                        "full_name": f"{first} {last}",
                        "provider_id": subject,
                        "picture": f"https://lh3.googleusercontent.com/a/{subject}",
                        "avatar_url": f"https://lh3.googleusercontent.com/a/{subject}",
                    },
                    created,
                    signed_in,
                )
            )
        profile = {
            "id": user_id,
            "email": email,
            "full_name": None if anonymous else f"{first} {last}",
            "phone": phone,
            "tags": sorted(rng.sample(TAGS, rng.randint(0, 2))),
            "preferences": {"lang": "es", "newsletter": rng.random() < 0.5},
            "created_at": created,
            "updated_at": created,
        }
        return user, identities, profile

    def identity(
        self,
        user_id: uuid.UUID,
        provider: str,
        provider_id: str,
        data: dict[str, Any],
        created: datetime,
        signed_in: datetime,
    ) -> dict[str, Any]:
        return {
            "id": self.uuid(),
            "provider_id": provider_id,
            "user_id": user_id,
            "identity_data": data,
            "provider": provider,
            "last_sign_in_at": signed_in,
            "created_at": created,
            "updated_at": created,
        }

    def next_id(self, table: str) -> int:
        self.ids[table] += 1
        return self.ids[table]

    def request(self, profile: dict[str, Any], start: datetime, end: datetime, rid: int) -> dict[str, Any]:
        rng = self.rng
        created = self.moment(max(start, profile["created_at"]), end)
        return {
            "id": rid,
            "profile_id": profile["id"],
            "amount": Decimal(rng.randrange(5_000_00, 2_500_000_00, 50_00)) / 100,
            "term_months": rng.choice(TERMS),
            "status": rng.choice(STATUSES),
            "purpose": rng.choice(PURPOSES),
            "details": {
                "income_source": rng.choice(["nomina", "negocio", "honorarios"]),
                "dependents": rng.randint(0, 4),
            }
            if rng.random() < 0.8
            else None,
            "created_at": created,
            "updated_at": created,
        }

    def bank(self, profile: dict[str, Any], start: datetime, end: datetime, bid: int) -> dict[str, Any]:
        rng = self.rng
        created = self.moment(max(start, profile["created_at"]), end)
        return {
            "id": bid,
            "profile_id": profile["id"],
            "bank_name": rng.choice(BANKS),
            "account_type": rng.choice(["nomina", "cheques", "ahorro", None]),
            "clabe": "".join(str(rng.randint(0, 9)) for _ in range(18)),
            "monthly_income": Decimal(rng.randrange(8_000_00, 300_000_00, 100)) / 100,
            "created_at": created,
            "updated_at": created,
        }

    def document(
        self, profile_id: uuid.UUID, request: dict[str, Any] | None, start: datetime, end: datetime, did: int
    ) -> dict[str, Any]:
        rng = self.rng
        floor = request["created_at"] if request else start
        created = self.moment(max(start, floor), end)
        return {
            "id": did,
            "request_id": request["id"] if request else None,
            "profile_id": profile_id,
            "kind": rng.choice(DOC_KINDS),
            "storage_path": f"{profile_id}/{self.uuid()}.pdf",
            "size_bytes": rng.randint(40_000, 4_000_000),
            "created_at": created,
            "updated_at": created,
        }


def generate(scale: int = 1, seed: int = DEFAULT_SEED) -> Scenario:
    """Draw both databases' rows for ``scale`` (1 = the seed document's counts)."""
    if scale < 1:
        raise ValueError("scale must be at least 1")
    g = _Generator(seed, scale)
    rng = g.rng
    s = scale
    n_users, n_old = PROD_USERS * s, PRE_COPY_USERS * s
    n_rereg, n_testers = DEV_REREGISTERED * s, DEV_TESTERS * s

    prod, old, dev_only = Side(), Side(), Side()
    created = sorted(g.moment(HISTORY_START, COPY_DATE) for _ in range(n_old))
    created += sorted(g.moment(COPY_DATE, PROPOSAL_DATE) for _ in range(n_users - n_old))
    for n, at in enumerate(created):
        user, identities, profile = g.user(n, at, cost=10 if n < COST10_USERS else 4)
        prod.users.append(user)
        prod.identities += identities
        prod.rows["profiles"].append(profile)
    old_profiles, new_profiles = prod.rows["profiles"][:n_old], prod.rows["profiles"][n_old:]
    named_old = [p for p in old_profiles if p["email"]]
    named_new = [p for p in new_profiles if p["email"]]

    # Pre-copy rows: in production and in the copy. Ids 1..k in creation order on both sides.
    dev_counts = {t: DEV[t] * s - DEV_TEST_ROWS[t] * s for t in DEV}
    old_requests = sorted(
        (
            g.request(rng.choice(named_old), HISTORY_START, COPY_DATE, 0)
            for _ in range(dev_counts["financing_requests"])
        ),
        key=lambda r: r["created_at"],
    )
    for r in old_requests:
        r["id"] = g.next_id("financing_requests")
    old_banks = sorted(
        (
            g.bank(rng.choice(named_old), HISTORY_START, COPY_DATE, 0)
            for _ in range(dev_counts["bank_profiles"])
        ),
        key=lambda r: r["created_at"],
    )
    for b in old_banks:
        b["id"] = g.next_id("bank_profiles")
    old_docs = _documents(g, old_requests, named_old, dev_counts["documents"], HISTORY_START, COPY_DATE)

    old.users = [dict(u) for u in prod.users[:n_old]]
    old_ids = {u["id"] for u in old.users}
    old.identities = [dict(i) for i in prod.identities if i["user_id"] in old_ids]
    old.rows = {
        "profiles": [dict(p) for p in old_profiles],
        "financing_requests": old_requests,
        "bank_profiles": old_banks,
        "documents": old_docs,
    }

    # Development after the copy: testers, re-registered people, test rows drawing the next ids.
    id_floor = dict(g.ids)
    reregistered = rng.sample(named_new, n_rereg)
    rereg_emails = [str(p["email"]) for p in reregistered]
    for k, p in enumerate(reregistered):
        email = str(p["email"])
        shown = email.upper() if k % 2 == 0 else email  # an admin script stored some as typed
        user, identities, profile = g.user(
            n_users + k, g.moment(COPY_DATE, PROPOSAL_DATE), email=shown, password=dev_password_for(email)
        )
        dev_only.users.append(user)
        dev_only.identities += identities
        dev_only.rows["profiles"].append(profile)
    for k in range(n_testers):
        user, identities, profile = g.user(
            n_users + n_rereg + k, g.moment(COPY_DATE, PROPOSAL_DATE), email=f"qa{k + 1}@ultima.dev"
        )
        dev_only.users.append(user)
        dev_only.identities += identities
        dev_only.rows["profiles"].append(profile)
    dev_profiles = dev_only.rows["profiles"]
    dev_requests = [
        g.request(rng.choice(dev_profiles), COPY_DATE, PROPOSAL_DATE, g.next_id("financing_requests"))
        for _ in range(DEV_TEST_ROWS["financing_requests"] * s)
    ]
    dev_only.rows["financing_requests"] = dev_requests
    dev_only.rows["bank_profiles"] = [
        g.bank(rng.choice(dev_profiles), COPY_DATE, PROPOSAL_DATE, g.next_id("bank_profiles"))
        for _ in range(DEV_TEST_ROWS["bank_profiles"] * s)
    ]
    dev_only.rows["documents"] = [
        g.document(r["profile_id"], r, COPY_DATE, PROPOSAL_DATE, g.next_id("documents"))
        for r in (rng.choice(dev_requests) for _ in range(DEV_TEST_ROWS["documents"] * s))
    ]

    # Production after the copy: new rows continue the same sequences (so they collide with
    # development's test rows), mostly by new users, some by old ones.
    g.ids = id_floor
    new_requests = sorted(
        (
            g.request(
                rng.choice(named_new if rng.random() < 0.85 else named_old), COPY_DATE, PROPOSAL_DATE, 0
            )
            for _ in range(PROD["financing_requests"] * s - len(old_requests))
        ),
        key=lambda r: r["created_at"],
    )
    for r in new_requests:
        r["id"] = g.next_id("financing_requests")
    new_banks = sorted(
        (
            g.bank(rng.choice(named_new if rng.random() < 0.85 else named_old), COPY_DATE, PROPOSAL_DATE, 0)
            for _ in range(PROD["bank_profiles"] * s - len(old_banks))
        ),
        key=lambda r: r["created_at"],
    )
    for b in new_banks:
        b["id"] = g.next_id("bank_profiles")
    new_docs = _documents(
        g, new_requests, named_new, PROD["documents"] * s - len(old_docs), COPY_DATE, PROPOSAL_DATE
    )

    # Production edits to pre-copy rows during the month.
    prod.rows["financing_requests"] = [dict(r) for r in old_requests] + new_requests
    prod.rows["bank_profiles"] = [dict(b) for b in old_banks] + new_banks
    prod.rows["documents"] = [dict(d) for d in old_docs] + new_docs
    edited: dict[str, set[Any]] = {t: set() for t in APP_TABLES}
    for p in rng.sample(prod.rows["profiles"][:n_old], 34 * s):
        p["phone"] = f"52133{rng.randrange(10**8):08d}"
        p["preferences"] = {**p["preferences"], "newsletter": not p["preferences"]["newsletter"]}
        p["updated_at"] = g.moment(COPY_DATE, PROPOSAL_DATE)
        edited["profiles"].add(p["id"])
    for r in rng.sample(prod.rows["financing_requests"][: len(old_requests)], 44 * s):
        r["status"] = "approved" if r["status"] != "approved" else "rejected"
        r["updated_at"] = g.moment(COPY_DATE, PROPOSAL_DATE)
        edited["financing_requests"].add(r["id"])
    for b in rng.sample(prod.rows["bank_profiles"][: len(old_banks)], 9 * s):
        b["monthly_income"] = b["monthly_income"] + Decimal("1500.00")
        b["updated_at"] = g.moment(COPY_DATE, PROPOSAL_DATE)
        edited["bank_profiles"].add(b["id"])

    soft_deleted = _soft_delete_some(prod, n_old, set(rereg_emails), random.Random(seed * 7 + scale))

    development = Side(
        users=old.users + dev_only.users,
        identities=old.identities + dev_only.identities,
        rows={t: old.rows[t] + dev_only.rows[t] for t in APP_TABLES},
    )
    return Scenario(
        production=prod,
        development=development,
        pre_copy_production=old,
        dev_only=dev_only,
        reregistered_emails=rereg_emails,
        edited=edited,
        scale=scale,
        soft_deleted=soft_deleted,
    )


def _soft_delete_some(prod: Side, n_old: int, reregistered: set[str], rng: random.Random) -> list[uuid.UUID]:
    """Soft-delete a few of production's new users that have financing requests, as the Auth server
    does (its admin delete with ``should_soft_delete``); their profiles and rows stay. A separate RNG, so
    every other row is the same as without them."""
    owners = {r["profile_id"] for r in prod.rows["financing_requests"]}
    latest: dict[uuid.UUID, datetime] = {}
    for table in ("financing_requests", "bank_profiles", "documents"):
        for row in prod.rows[table]:
            owner = row["profile_id"]
            latest[owner] = max(row["created_at"], latest.get(owner, row["created_at"]))
    candidates = [
        u
        for u in prod.users[n_old:]
        if u["email"] and u["id"] in owners and u["email"] not in reregistered and not u["is_anonymous"]
    ]
    google = {i["user_id"] for i in prod.identities if i["provider"] == "google"}
    count = SOFT_DELETED_USERS * (len(prod.users) // PROD_USERS)
    chosen = rng.sample([u for u in candidates if u["id"] in google], 1)
    chosen += rng.sample([u for u in candidates if u["id"] not in google], count - 1)
    for user in chosen:
        # After the user's last row and sign-in: the app kept the rows, the account went.
        floor = max(latest[user["id"]], user["last_sign_in_at"], user["updated_at"])
        at = floor + timedelta(hours=rng.randint(1, 72))
        soft_delete(user, [i for i in prod.identities if i["user_id"] == user["id"]], at)
    return [u["id"] for u in chosen]


def soft_delete(user: dict[str, Any], identities: Sequence[dict[str, Any]], at: datetime) -> None:
    """What the Auth server's soft delete writes (``SoftDeleteUser``, ``SoftDeleteUserIdentities`` in
    its ``internal/models/user.go``): :func:`soft_deleted_columns`, metadata emptied, ``deleted_at``;
    each identity's data emptied and its provider id scrambled."""
    user.update(soft_deleted_columns(user))
    user["raw_user_meta_data"], user["raw_app_meta_data"] = {}, {}
    user["deleted_at"] = user["updated_at"] = at
    for identity in identities:
        identity["identity_data"] = {}
        identity["provider_id"] = obfuscated(user["id"], f"{identity['provider']}:{identity['provider_id']}")
        identity["updated_at"] = at


def soft_deleted_columns(user: Mapping[str, Any]) -> dict[str, Any]:
    """The columns the Auth server's ``SoftDeleteUser`` writes first, with their new values: e-mail and
    phone (even none) and their pending changes replaced by scrambles, no password, tokens cleared."""
    user_id = user["id"]
    return {
        "email": obfuscated(user_id, user.get("email") or ""),
        "phone": obfuscated(user_id, user.get("phone") or "")[:15],
        "email_change": obfuscated(user_id, user.get("email_change") or ""),
        "phone_change": obfuscated(user_id, user.get("phone_change") or "")[:15],
        "encrypted_password": None,
        **dict.fromkeys(
            (
                "confirmation_token",
                "recovery_token",
                "email_change_token_current",
                "email_change_token_new",
                "phone_change_token",
            ),
            "",
        ),
    }


def obfuscated(user_id: uuid.UUID, value: str) -> str:
    """The Auth server's scramble: base64url (unpadded) of sha256 of the user id's text and the value."""
    digest = hashlib.sha256((str(user_id) + value).encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _documents(
    g: _Generator,
    requests: Sequence[dict[str, Any]],
    profiles: Sequence[dict[str, Any]],
    count: int,
    start: datetime,
    end: datetime,
) -> list[dict[str, Any]]:
    docs = []
    for _ in range(count):
        if g.rng.random() < 0.85:
            req = g.rng.choice(requests)
            docs.append(g.document(req["profile_id"], req, start, end, 0))
        else:
            docs.append(g.document(g.rng.choice(profiles)["id"], None, start, end, 0))
    docs.sort(key=lambda d: d["created_at"])
    for d in docs:
        d["id"] = g.next_id("documents")
    return docs


# ---------------------------------------------------------------------------------------------- loading


def _copy(
    conn: psycopg.Connection, table: str, columns: Sequence[str], rows: Iterable[dict[str, Any]]
) -> None:
    """Binary COPY of ``rows`` into ``table``: the column types are declared once, so values are
    dumped by psycopg's C code rather than adapted one by one."""
    from psycopg import sql

    schema, name = table.split(".")
    types = dict(
        conn.execute(
            "SELECT attname, CASE WHEN t.typtype = 'e' THEN 'text' "
            "ELSE format_type(a.atttypid, NULL) END "
            "FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
            "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
            (table,),
        ).fetchall()
    )
    query = sql.SQL("COPY {}.{} ({}) FROM STDIN (FORMAT BINARY)").format(
        sql.Identifier(schema), sql.Identifier(name), sql.SQL(", ").join(map(sql.Identifier, columns))
    )
    with conn.cursor().copy(query) as copy:
        copy.set_types([types[c] for c in columns])
        for row in rows:
            copy.write_row([Jsonb(v) if isinstance(v, dict) else v for v in (row[c] for c in columns)])


def _load(conn: psycopg.Connection, side: Side, profile_columns: Sequence[str] = PROFILE_COLUMNS) -> None:
    _copy(conn, "auth.users", USER_COLUMNS, side.users)
    _copy(conn, "auth.identities", IDENTITY_COLUMNS, side.identities)
    _copy(conn, "public.profiles", PROFILE_COLUMNS, side.rows["profiles"])
    _copy(conn, "public.financing_requests", REQUEST_COLUMNS, side.rows["financing_requests"])
    _copy(conn, "public.bank_profiles", BANK_COLUMNS, side.rows["bank_profiles"])
    _copy(conn, "public.documents", DOCUMENT_COLUMNS, side.rows["documents"])


def _advance_sequences(conn: psycopg.Connection) -> None:
    for table in ("financing_requests", "bank_profiles", "documents"):
        conn.execute(
            f"SELECT setval(pg_get_serial_sequence('public.{table}', 'id'), "
            f"(SELECT coalesce(max(id), 0) + 1 FROM public.{table}), false)"
        )


def _run(conn: psycopg.Connection, name: str) -> None:
    conn.execute((SQL_DIR / "scenario" / name).read_text())  # type: ignore[arg-type]


def build_production(url: str, scenario: Scenario) -> None:
    """Create production's schema and rows in the (Supabase-shaped, empty) database at ``url``."""
    with psycopg.connect(url) as conn:
        _run(conn, "production.sql")
        _load(conn, scenario.production)
        _advance_sequences(conn)
        _run(conn, "signup_trigger.sql")


def build_development(url: str, scenario: Scenario) -> None:
    """Create the development copy: production as of the copy date, the new schema, the month's dev rows."""
    with psycopg.connect(url) as conn:
        _run(conn, "production.sql")
        _load(conn, scenario.pre_copy_production)
        _run(conn, "signup_trigger.sql")
    with psycopg.connect(url) as conn:
        _run(conn, "development.sql")
    with psycopg.connect(url) as conn:
        dev = scenario.dev_only
        # These people signed up through the new site, which moves them on to its third onboarding step.
        sign_up(conn, dev, onboarding_step=3)
        _copy(conn, "public.financing_requests", REQUEST_COLUMNS, dev.rows["financing_requests"])
        _copy(conn, "public.bank_profiles", BANK_COLUMNS, dev.rows["bank_profiles"])
        _copy(conn, "public.documents", DOCUMENT_COLUMNS, dev.rows["documents"])
        _advance_sequences(conn)
        _develop_rows(conn, scenario)


def sign_up(conn: psycopg.Connection, side: Side, onboarding_step: int | None = None) -> None:
    """``side``'s users sign up: their users and identities are written as the Auth server writes them,
    the signup trigger makes each profile, and the profile is completed (development's new
    ``onboarding_step`` too, when given)."""
    _copy(conn, "auth.users", USER_COLUMNS, side.users)
    _copy(conn, "auth.identities", IDENTITY_COLUMNS, side.identities)
    step = "" if onboarding_step is None else f"onboarding_step = {int(onboarding_step)}, "
    with conn.cursor() as cur:
        cur.executemany(
            f"UPDATE public.profiles SET phone = %s, tags = %s, preferences = %s, {step}"  # type: ignore[arg-type]
            "created_at = %s, updated_at = %s WHERE id = %s",
            [
                (p["phone"], p["tags"], Jsonb(p["preferences"]), p["created_at"], p["updated_at"], p["id"])
                for p in side.rows["profiles"]
            ],
        )


def signups(count: int, at: datetime, seed: int = DEFAULT_SEED) -> Side:
    """``count`` new people (users, identities, profiles) drawn as the scenario draws its users, created
    at ``at``; their e-mails are numbered past every scenario user's, so they are nobody's yet."""
    g = _Generator(seed + 1, 1)
    side = Side()
    for k in range(count):
        user, identities, profile = g.user(SIGNUP_NUMBERS + k, at)
        side.users.append(user)
        side.identities += identities
        side.rows["profiles"].append(profile)
    return side


SIGNUP_NUMBERS = 10**7
"""Where :func:`signups` numbers its people's e-mails: past any scale's users."""


def _develop_rows(conn: psycopg.Connection, scenario: Scenario) -> None:
    """The month's work in development on copied rows: only in columns production does not have."""
    rng = random.Random(scenario.scale * 7919 + DEFAULT_SEED)
    old = scenario.pre_copy_production
    profiles = [p["id"] for p in old.rows["profiles"]]
    with conn.cursor() as cur:
        cur.executemany(
            "UPDATE public.profiles SET onboarding_step = %s WHERE id = %s",
            [(rng.randint(1, 4), pid) for pid in rng.sample(profiles, 100 * scenario.scale)],
        )
        requests = [r["id"] for r in old.rows["financing_requests"]]
        cur.executemany(
            "UPDATE public.financing_requests SET risk_score = %s, channel = 'app' WHERE id = %s",
            [
                (Decimal(rng.randrange(0, 10000)) / 100, rid)
                for rid in rng.sample(requests, 50 * scenario.scale)
            ],
        )
        dev_profiles = [p["id"] for p in scenario.dev_only.rows["profiles"]] + profiles[:20]
        cur.executemany(
            "INSERT INTO public.notifications (id, profile_id, message, created_at) VALUES (%s, %s, %s, %s)",
            [
                (
                    uuid.UUID(int=rng.getrandbits(128), version=4),
                    rng.choice(dev_profiles),
                    f"Aviso de prueba {k}",
                    COPY_DATE + timedelta(days=rng.randint(0, 29)),
                )
                for k in range(DEV_NOTIFICATIONS * scenario.scale)
            ],
        )


def table_counts(url: str) -> dict[str, int]:
    """Rows per scenario table (auth users, identities, app tables) in the database at ``url``."""
    tables = ["auth.users", "auth.identities", *(f"public.{t}" for t in APP_TABLES), "public.notifications"]
    counts: dict[str, int] = {}
    with psycopg.connect(url) as conn:
        for table in tables:
            exists = conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()
            if exists and exists[0]:
                counts[table] = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # type: ignore[index]
    return counts


def expected_counts(scale: int = 1) -> dict[str, dict[str, int]]:
    """The seed document's counts (times ``scale``) per database and table."""
    s = scale
    dev_users = (PRE_COPY_USERS + DEV_REREGISTERED + DEV_TESTERS) * s
    return {
        "production": {
            "auth.users": PROD_USERS * s,
            "public.profiles": PROD_USERS * s,
            **{f"public.{t}": n * s for t, n in PROD.items()},
        },
        "development": {
            "auth.users": dev_users,
            "public.profiles": dev_users,
            **{f"public.{t}": n * s for t, n in DEV.items()},
        },
    }


def dumps(value: Any) -> str:
    """JSON for reports (dates and decimals as strings)."""
    return json.dumps(value, default=str, sort_keys=True)


# ------------------------------------------------------------------------------------------------ files

FILES_BUCKET = "documents"
"""The bucket every document's file lives in, in both projects (private, PDFs, at most 10 MB)."""
BUCKET_SETTINGS: dict[str, Any] = {
    "public": False,
    "file_size_limit": 10 * 1024 * 1024,
    "allowed_mime_types": ["application/pdf"],
}
LARGE_EVERY = 50
"""One document in this many has a 40–60 KB file: above a small resumable-upload threshold in tests."""


def file_bytes(path: str) -> bytes:
    """The deterministic content of the file at ``path``: a PDF header and 1–8 KB (some 40–60 KB) of bytes
    drawn from the path, so both projects and every test agree on it without storing it anywhere."""
    digest = hashlib.sha256(path.encode()).digest()
    number = int.from_bytes(digest[:4], "big")
    size = 40_000 + number % 20_000 if number % LARGE_EVERY == 0 else 1024 + number % 7168
    head = b"%PDF-1.4\n"
    body = (digest * (size // len(digest) + 1))[: size - len(head)]
    return head + body


def document_files(side: Side) -> list[str]:
    """The storage paths of ``side``'s documents: production has a file for every document; development
    for the documents its own testers uploaded (the database copy a month ago brought no files)."""
    return [d["storage_path"] for d in side.rows["documents"]]


async def upload_files(
    storage_url: str, service_key: str, paths: Sequence[str], concurrency: int = 8
) -> None:
    """Create the documents bucket (when missing) and upload each path's file through the Storage API."""
    headers = {"Authorization": f"Bearer {service_key}", "apikey": service_key}
    base = f"{storage_url.rstrip('/')}/storage/v1"
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.post(f"{base}/bucket", json={"name": FILES_BUCKET, **BUCKET_SETTINGS}) as created:
            answer = await created.json()
            if created.status != 200 and answer.get("statusCode") != "409":
                raise RuntimeError(f"cannot create the {FILES_BUCKET} bucket: {answer}")
        slots = asyncio.Semaphore(concurrency)
        sent = {"Content-Type": "application/pdf", "Cache-Control": "max-age=3600", "x-upsert": "true"}

        async def put(path: str) -> None:
            async with (
                slots,
                http.post(f"{base}/object/{FILES_BUCKET}/{path}", data=file_bytes(path), headers=sent) as r,
            ):
                if r.status != 200:
                    raise RuntimeError(f"cannot upload {path}: {await r.text()}")

        await asyncio.gather(*(put(p) for p in paths))
