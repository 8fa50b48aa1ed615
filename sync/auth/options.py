"""How the auth import runs: its options, and where the admin API is.

Modes and policies are the tool's one vocabulary (:mod:`sync.modes`), as the mapping file spells them.
"""

from __future__ import annotations

from pydantic import ConfigDict, Field, SecretStr, field_validator

from sync.models import Model
from sync.modes import AuthMode, ConflictPolicy, TriggerMode
from sync.retry import DEFAULT_ATTEMPTS, DEFAULT_INITIAL_WAIT, DEFAULT_MAX_WAIT

__all__ = ["AdminApi", "AuthMode", "AuthOptions", "ConflictPolicy", "TriggerMode"]


class AuthOptions(Model):
    """How the auth import runs; the mapping file and the command line fill it."""

    model_config = ConfigDict(frozen=True)

    mode: AuthMode = AuthMode.DIRECT
    policy: ConflictPolicy = ConflictPolicy.SOURCE_WINS
    triggers: TriggerMode = TriggerMode.FIRE
    batch_size: int = Field(default=2000, ge=1, description="users per target transaction")
    copy_size: int = Field(
        default=20000, ge=1, description="direct: users per target transaction when created by COPY"
    )
    jobs: int = Field(
        default=1,
        ge=1,
        description="direct: groups created by COPY at once, each on a target and a source connection",
    )
    concurrency: int = Field(default=8, ge=1, description="admin-api: requests in flight at once")
    include_mfa: bool = Field(default=False, description="copy mfa_factors too (not available yet)")
    retry_attempts: int = Field(default=DEFAULT_ATTEMPTS, ge=1)
    retry_initial_wait: float = Field(default=DEFAULT_INITIAL_WAIT, ge=0)
    retry_max_wait: float = Field(default=DEFAULT_MAX_WAIT, ge=0)

    @field_validator("policy")
    @classmethod
    def _source_or_target(cls, policy: ConflictPolicy) -> ConflictPolicy:
        """newest-wins is a rule for table rows; users follow source-wins or target-wins."""
        if policy is ConflictPolicy.NEWEST_WINS:
            raise ValueError("users are matched under source-wins or target-wins, not newest-wins")
        return policy


class AdminApi(Model):
    """Where the admin API is: the project URL and the service-role key (never printed)."""

    model_config = ConfigDict(frozen=True)

    url: str
    service_role_key: SecretStr
    # Longer than the Auth server's own 10 s request limit: a slow create then answers instead of
    # leaving the client to guess whether it landed.
    timeout: float = Field(default=15.0, gt=0)
