"""How the auth import runs: its modes and policy, its options, and where the admin API is.

The modes are spelled as in the mapping file (``sync.auth``, ``sync.triggers``); the three enums live
here together so that one vocabulary can replace them at once.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from sync.retry import DEFAULT_ATTEMPTS, DEFAULT_INITIAL_WAIT, DEFAULT_MAX_WAIT


class AuthMode(StrEnum):
    """How users are written: SQL into the auth tables, or the Auth admin API."""

    DIRECT = "direct"
    ADMIN_API = "admin-api"


class ConflictPolicy(StrEnum):
    """Whose values a matched user keeps: production's, or the target's own."""

    SOURCE_WINS = "source-wins"
    TARGET_WINS = "target-wins"


class TriggerMode(StrEnum):
    """Whether triggers on ``auth.users`` fire for the users the import writes."""

    FIRE = "fire"
    SKIP = "skip"


class AuthOptions(BaseModel):
    """How the auth import runs; the mapping file and the command line fill it."""

    model_config = ConfigDict(frozen=True)

    mode: AuthMode = AuthMode.DIRECT
    policy: ConflictPolicy = ConflictPolicy.SOURCE_WINS
    triggers: TriggerMode = TriggerMode.FIRE
    batch_size: int = Field(default=2000, ge=1, description="users per target transaction")
    concurrency: int = Field(default=8, ge=1, description="admin-api: requests in flight at once")
    include_mfa: bool = Field(default=False, description="copy mfa_factors too (not available yet)")
    retry_attempts: int = Field(default=DEFAULT_ATTEMPTS, ge=1)
    retry_initial_wait: float = Field(default=DEFAULT_INITIAL_WAIT, ge=0)
    retry_max_wait: float = Field(default=DEFAULT_MAX_WAIT, ge=0)


class AdminApi(BaseModel):
    """Where the admin API is: the project URL and the service-role key (never printed)."""

    model_config = ConfigDict(frozen=True)

    url: str
    service_role_key: SecretStr
    # Longer than the Auth server's own 10 s request limit: a slow create then answers instead of
    # leaving the client to guess whether it landed.
    timeout: float = Field(default=15.0, gt=0)
