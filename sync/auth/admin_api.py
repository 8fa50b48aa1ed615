"""The admin-API client path: users created through the Auth server's admin API (the ``supabase`` client).

Idempotent creates with bounded concurrency and retries; an "e-mail exists" answer is resolved by finding
the holder of the address and mapping to it, or by quarantining the user.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from uuid import UUID

import httpx
from pydantic import ValidationError
from supabase import AsyncClientOptions, acreate_client
from supabase_auth.errors import AuthApiError, AuthError

from sync.auth.admin_api_errors import (
    api_message,
    http_retry_after,
    is_transient_api_error,
    is_transient_http_error,
    retry_after,
)
from sync.auth.admin_api_user import create_attributes
from sync.auth.match import MatchKind, TargetKey, UserMatch, normal_email, normal_phone
from sync.auth.options import AdminApi, AuthOptions
from sync.errors import UsageError
from sync.retry import retrying


class ApiOutcome(StrEnum):
    """What one create through the admin API came to."""

    CREATED = "created"
    MAPPED = "mapped"
    DIRECT = "direct"
    QUARANTINED = "quarantined"


@dataclass(frozen=True, slots=True)
class ApiResult:
    """What creating one user through the admin API came to: created, mapped to the holder of its
    e-mail/phone, to be written directly instead, or quarantined (with the reason)."""

    outcome: ApiOutcome
    target_id: UUID | None = None
    kind: MatchKind = MatchKind.NEW
    reason: str | None = None


HolderLookup = Callable[[str, str], Awaitable[UUID | None]]
"""``(kind, value)`` → the id of the target user whose e-mail (``kind`` "email") or phone it is."""


class AdminApiCreator:
    """Creates users through the Auth admin API, idempotently, with bounded concurrency and retries.

    ``claimed`` is the matching's target id → source id map, kept current as users get mapped;
    ``find_holder`` says who holds an e-mail/phone (by default the admin API's list filter, which
    finds e-mails only).
    """

    def __init__(
        self,
        api: AdminApi,
        options: AuthOptions,
        claimed: dict[UUID, UUID],
        find_holder: HolderLookup | None = None,
    ) -> None:
        self.api = api
        self.options = options
        self.claimed = claimed
        self.find_holder = find_holder or self._list_holder
        self._http: httpx.AsyncClient | None = None
        self._client: Any = None
        self._slots = asyncio.Semaphore(options.concurrency)

    async def __aenter__(self) -> AdminApiCreator:
        self._http = httpx.AsyncClient(timeout=self.api.timeout, follow_redirects=True)
        self._client = await acreate_client(
            self.api.url,
            self.api.service_role_key.get_secret_value(),
            options=AsyncClientOptions(
                auto_refresh_token=False, persist_session=False, httpx_client=self._http
            ),
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._http is not None:
            await self._http.aclose()

    @property
    def admin(self) -> Any:
        """The client's ``auth.admin`` (``AsyncGoTrueAdminAPI``)."""
        return self._client.auth.admin

    async def list_target(self) -> list[TargetKey]:
        """Every target user's keys, page by page (when no target DSN is at hand)."""
        keys: list[TargetKey] = []
        page, per_page = 1, 1000
        while True:
            users = await self._call(self.admin.list_users, "listing the target's users", page, per_page)
            for user in users:
                email = normal_email(user.email)
                keys.append(
                    TargetKey(
                        UUID(str(user.id)),
                        email,
                        normal_phone(user.phone),
                        exact_email=user.email == email,
                        created_at=user.created_at,
                    )
                )
            if len(users) < per_page:
                return keys
            page += 1

    async def create_all(self, users: Sequence[tuple[Mapping[str, Any], UserMatch]]) -> list[ApiResult]:
        """Create each (row, match), at most ``concurrency`` at once; results in the same order."""
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._bounded(row, match)) for row, match in users]
        except* Exception as failures:  # the first failure is the one worth a message
            raise failures.exceptions[0] from None
        return [task.result() for task in tasks]

    async def _bounded(self, row: Mapping[str, Any], match: UserMatch) -> ApiResult:
        async with self._slots:
            return await self.create(row, match)

    async def create(self, row: Mapping[str, Any], match: UserMatch) -> ApiResult:
        """Create one user. Before every retry the user is looked up by id: a 504 or a timeout may hide
        a create that landed, and creating it again would answer 500 (taken id) or 422 (taken e-mail)."""
        attributes = create_attributes(row, match)
        tries = 0

        async def attempt() -> ApiResult:
            nonlocal tries
            tries += 1
            if tries > 1 and (found := await self._get(row["id"])) is not None:
                return self._landed(attributes, found)
            try:
                await self.admin.create_user(attributes)
            except ValidationError:
                # A 200 the client could not parse: the user exists; make sure it is this one.
                found = await self._get(row["id"])
                if found is None:
                    raise
                return self._landed(attributes, found)
            except AuthApiError as exc:
                if exc.status in (401, 403):
                    raise UsageError(
                        f"The Auth server refused the service-role key ({exc.status} {exc.code}): "
                        "check --service-role-key / SUPABASE_SERVICE_ROLE_KEY."
                    ) from None
                if exc.status == 422 and exc.code in ("email_exists", "phone_exists"):
                    return await self._held(row, match, "email" if exc.code == "email_exists" else "phone")
                raise
            return ApiResult(ApiOutcome.CREATED, row["id"])

        try:
            return await self._retrying(f"creating user {row['id']}")(attempt)
        except (AuthError, ValidationError, httpx.HTTPError) as exc:
            if not is_transient_api_error(exc):
                return ApiResult(ApiOutcome.QUARANTINED, reason=f"admin API: {api_message(exc)}")
            if (found := await self._get_quietly(row["id"])) is not None:
                return self._landed(attributes, found)
            # A 500 that outlived the retries hides its cause (often a trigger that raises); a direct
            # write, when possible, lands the user or quarantines it with the database's own message.
            return ApiResult(
                ApiOutcome.DIRECT, row["id"], reason=f"admin API kept failing: {api_message(exc)}"
            )

    @staticmethod
    def _landed(attributes: Mapping[str, Any], found: Any) -> ApiResult:
        """A user with this id exists: it is the one an earlier attempt created if it has what was sent."""
        if (normal_email(found.email), normal_phone(found.phone)) == (
            attributes.get("email"),
            attributes.get("phone"),
        ):
            return ApiResult(ApiOutcome.CREATED, UUID(attributes["id"]))
        return ApiResult(
            ApiOutcome.QUARANTINED,
            reason=f"its id is already used on the target by another user ({found.email or found.phone})",
        )

    async def _held(self, row: Mapping[str, Any], match: UserMatch, kind: str) -> ApiResult:
        value = normal_email(row["email"]) if kind == "email" else normal_phone(row["phone"])
        holder = await self.find_holder(kind, value or "")
        if holder == row["id"]:
            return ApiResult(ApiOutcome.CREATED, holder)  # an earlier attempt landed after all
        if holder is None:
            return ApiResult(
                ApiOutcome.QUARANTINED,
                reason=f"the Auth server says {kind} {value} is taken, but no user has it as its {kind}: "
                "another user's identity (e.g. a Google account) carries it; unlink it, then rerun",
            )
        if row["deleted_at"] is not None:
            return ApiResult(
                ApiOutcome.QUARANTINED,
                reason=f"deleted in production, and its {kind} {value} now belongs to target user {holder}",
            )
        other = self.claimed.get(holder)
        if other is not None:
            return ApiResult(
                ApiOutcome.QUARANTINED,
                reason=f"its {kind} {value} belongs to target user {holder}, already matched to production "
                f"user {other}: merge or change one of them, then rerun",
            )
        self.claimed[holder] = row["id"]
        return ApiResult(ApiOutcome.MAPPED, holder, MatchKind(kind))

    async def _list_holder(self, kind: str, value: str) -> UUID | None:
        if kind != "email":
            return None  # the list filter searches e-mails and names only
        assert self._http is not None
        key = self.api.service_role_key.get_secret_value()

        async def search() -> httpx.Response:
            response = await self._http.get(  # type: ignore[union-attr]
                f"{self.api.url.rstrip('/')}/auth/v1/admin/users",
                params={"filter": value, "per_page": "1000"},
                headers={
                    "apikey": key,
                    "Authorization": f"Bearer {key}",
                    "X-Supabase-Api-Version": "2024-01-01",
                },
            )
            response.raise_for_status()
            return response

        response = await self._retrying(f"looking up who holds {value}", http=True)(search)
        for user in response.json().get("users", []):
            # The filter is a LIKE: '_' and '%' in addresses are wildcards, so compare exactly here.
            if normal_email(user.get("email")) == value:
                return UUID(user["id"])
        return None

    async def _get(self, user_id: UUID) -> Any:
        """The target user with this id, or None (404)."""
        try:
            return (await self.admin.get_user_by_id(str(user_id))).user
        except AuthApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def _get_quietly(self, user_id: UUID) -> Any:
        try:
            return await self._call(self._get, f"looking up user {user_id}", user_id)
        except (AuthError, ValidationError, httpx.HTTPError):
            return None  # the create already failed; this lookup only rescues a hidden success

    async def _call(self, call: Callable[..., Awaitable[Any]], what: str, *args: Any) -> Any:
        return await self._retrying(what)(call, *args)

    def _retrying(self, what: str, *, http: bool = False) -> Any:
        o = self.options
        return retrying(
            is_transient_http_error if http else is_transient_api_error,
            attempts=o.retry_attempts,
            initial_wait=o.retry_initial_wait,
            max_wait=o.retry_max_wait,
            wait_hint=http_retry_after if http else retry_after,
            what=what,
        )
