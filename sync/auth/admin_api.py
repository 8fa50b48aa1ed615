"""The admin-API client path: users created through the Auth server's admin API (the ``supabase`` client).

The credentials are checked once, with one authenticated list call, before anything is written. Creates
are idempotent, with bounded concurrency and retries; every answer is checked (the id sent is the id
made); an "e-mail exists" answer is resolved by finding the holder of the address and mapping to it, or
by quarantining the user. Failures are classified by the HTTP answer (:mod:`admin_api_errors`), so a
client release that wraps its errors differently changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any
from uuid import UUID

import httpx
from pydantic import TypeAdapter, ValidationError
from supabase import AsyncClientOptions, acreate_client

from sync.auth.admin_api_errors import (
    KEY_REFUSALS_RETRIED,
    ApiCallError,
    ApiFailure,
    Exchange,
    current_exchange,
    failure_of,
    record_request,
    record_response,
)
from sync.auth.admin_api_user import create_attributes
from sync.auth.match import MatchKind, TargetKey, UserMatch, normal_email, normal_phone
from sync.auth.options import AdminApi, AuthOptions
from sync.errors import SyncError, UsageError
from sync.retry import retrying

# httpx logs every request at INFO; the tool reports failures itself, in one line.
logging.getLogger("httpx").setLevel(logging.WARNING)
_TIME = TypeAdapter(datetime)


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


class AuthServerError(SyncError):
    """The Auth server does not do what the admin-API mode relies on; the message names what it did."""


HolderLookup = Callable[[str, str], Awaitable[UUID | None]]
"""``(kind, value)`` → the id of the target user whose e-mail (``kind`` "email") or phone it is."""

HashLookup = Callable[[UUID], Awaitable[str | None]]
"""A created user's id → the password hash the target stored for it."""


async def check_admin_api(api: AdminApi, options: AuthOptions | None = None) -> None:
    """Raise UsageError (one line) unless the Auth server at ``api.url`` accepts the service-role key."""
    async with AdminApiCreator(api, options or AuthOptions(mode="admin-api"), {}) as creator:
        await creator.check_credentials()


class AdminApiCreator:
    """Creates users through the Auth admin API, idempotently, with bounded concurrency and retries.

    ``claimed`` is the matching's target id → source id map, kept current as users get mapped;
    ``find_holder`` says who holds an e-mail/phone (by default the admin API's user list, compared
    normalised); ``stored_hash`` (with the target DSN) reads what the target stored for a created user.
    """

    def __init__(
        self,
        api: AdminApi,
        options: AuthOptions,
        claimed: dict[UUID, UUID],
        find_holder: HolderLookup | None = None,
        stored_hash: HashLookup | None = None,
    ) -> None:
        self.api = api
        self.options = options
        self.claimed = claimed
        self.find_holder = find_holder or self._list_holder
        self.stored_hash = stored_hash
        self._http: httpx.AsyncClient | None = None
        self._client: Any = None
        self._slots = asyncio.Semaphore(options.concurrency)
        self._answer_checked = False
        self.page_size = 1000  # users per page when listing the target

    async def __aenter__(self) -> AdminApiCreator:
        self._http = httpx.AsyncClient(
            timeout=self.api.timeout,
            follow_redirects=True,
            event_hooks={"request": [record_request], "response": [record_response]},
        )
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

    # -- credentials and listing ---------------------------------------------------------------

    async def check_credentials(self) -> None:
        """One authenticated list call; a refused key or an unreachable server is one line (UsageError)."""
        try:
            await self._retrying("checking the service-role key", key_refusals=0)(self._list_page, 1, 1)
        except ApiCallError as exc:
            raise _usage_error(exc.failure, self.api.url) from None

    async def list_target(self) -> list[TargetKey]:
        """Every target user's keys (when no target DSN is at hand); SSO users match by id only. A list
        the server keeps refusing stops the run with one line."""
        keys = []
        try:
            async for user in self._every_user("listing the target's users"):
                sso = _is_sso(user)
                email = None if sso else normal_email(user.get("email"))
                keys.append(
                    TargetKey(
                        UUID(user["id"]),
                        email,
                        None if sso else normal_phone(user.get("phone")),
                        is_sso_user=sso,
                        exact_email=user.get("email") == email,
                        created_at=_TIME.validate_python(user["created_at"])
                        if user.get("created_at")
                        else None,
                    )
                )
        except ApiCallError as exc:
            if exc.failure.refused_key:
                raise _usage_error(exc.failure, self.api.url) from None
            raise AuthServerError(
                f"The Auth server at {self.api.url} kept failing to list the target's users "
                f"({exc.failure.line()}): rerun the same command."
            ) from None
        return keys

    async def _every_user(self, what: str) -> Any:
        """Every target user once, as the list answers it, oldest first (new users append, so pages stay
        put). The server pages with ``ORDER BY created_at LIMIT … OFFSET …``: users that share a
        ``created_at`` (a bulk import) may come in another order on the next page, one seen twice and
        another never; when the pages held fewer users than the server counts, the rest come from one
        read of the whole list."""
        seen: set[str] = set()
        page, total = 1, 0
        while True:
            users, total = await self._retrying(what)(self._list_page, page, self.page_size)
            for user in users:
                if user["id"] not in seen:
                    seen.add(user["id"])
                    yield user
            if len(users) < self.page_size:
                break
            page += 1
        if len(seen) < total:
            users, _ = await self._retrying(what)(self._list_page, 1, total + self.page_size)
            for user in users:
                if user["id"] not in seen:
                    seen.add(user["id"])
                    yield user

    async def _list_page(self, page: int, per_page: int) -> tuple[list[dict[str, Any]], int]:
        """One page of the list and the number of users the server counts (``X-Total-Count``)."""
        assert self._http is not None
        key = self.api.service_role_key.get_secret_value()

        async def get() -> httpx.Response:
            response = await self._http.get(  # type: ignore[union-attr]
                f"{self.api.url.rstrip('/')}/auth/v1/admin/users",
                params={"page": str(page), "per_page": str(per_page), "sort": "created_at asc"},
                headers={
                    "apikey": key,
                    "Authorization": f"Bearer {key}",
                    "X-Supabase-Api-Version": "2024-01-01",
                },
            )
            response.raise_for_status()
            return response

        response = await self._api(get)
        users = list(response.json().get("users") or [])
        total = response.headers.get("x-total-count", "")
        return users, int(total) if total.isdigit() else len(users)

    async def _list_holder(self, kind: str, value: str) -> UUID | None:
        """The oldest non-SSO target user whose normalised e-mail/phone is ``value`` (the list's ``filter``
        is a case-sensitive LIKE on e-mails only, so the comparison is made here)."""
        normal = normal_email if kind == "email" else normal_phone
        async for user in self._every_user(f"looking up who holds {value}"):
            if not _is_sso(user) and normal(user.get(kind)) == value:
                return UUID(user["id"])
        return None

    # -- creates -------------------------------------------------------------------------------

    async def create_all(self, users: Sequence[tuple[Mapping[str, Any], UserMatch]]) -> list[ApiResult]:
        """Create each (row, match), at most ``concurrency`` at once; results in the same order.

        Creates go one at a time until one answer was checked: if the server does not keep what was
        sent, the run stops before a second user exists."""
        results: list[ApiResult] = []
        while users and not self._answer_checked:
            results.append(await self.create(*users[0]))
            users = users[1:]
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._bounded(row, match)) for row, match in users]
        except* Exception as failures:  # the first failure is the one worth a message
            raise failures.exceptions[0] from None
        return results + [task.result() for task in tasks]

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
                answer = await self._api(self.admin.create_user, attributes)
            except ValidationError:
                # A 200 the client could not parse: the user exists; make sure it is this one.
                found = await self._get(row["id"])
                if found is None:
                    raise
                return self._landed(attributes, found)
            except ApiCallError as exc:
                if exc.failure.status == 422 and exc.failure.code in ("email_exists", "phone_exists"):
                    kind = "email" if exc.failure.code == "email_exists" else "phone"
                    return await self._held(row, match, kind)
                raise
            await self._check_answer(attributes, answer.user)
            return ApiResult(ApiOutcome.CREATED, row["id"])

        try:
            return await self._retrying(f"creating user {row['id']}")(attempt)
        except (ApiCallError, ValidationError) as exc:
            failure = failure_of(exc)
            if failure.refused_key:
                raise _usage_error(failure, self.api.url) from None
            if failure.status in (400, 413):
                # The server's format checks or its body cap: a direct write carries what it refuses.
                return ApiResult(
                    ApiOutcome.DIRECT, row["id"], reason=f"the admin API refused it: {failure.line()}"
                )
            if not failure.transient:
                return ApiResult(ApiOutcome.QUARANTINED, reason=f"admin API: {failure.line()}")
            if (found := await self._get_quietly(row["id"])) is not None:
                return self._landed(attributes, found)
            # A 500 that outlived the retries hides its cause (often a trigger that raises); a direct
            # write, when possible, lands the user or quarantines it with the database's own message.
            return ApiResult(ApiOutcome.DIRECT, row["id"], reason=f"admin API kept failing: {failure.line()}")

    async def _check_answer(self, attributes: Mapping[str, Any], user: Any) -> None:
        """Stop the run when the server did not make the user that was sent (an Auth release older than
        custom ids and password hashes on admin create drops both without a word)."""
        sent = attributes["id"]
        made = str(getattr(user, "id", "") or "")
        if made != sent:
            raise AuthServerError(
                f"The Auth server at {self.api.url} ignored the id sent with admin create (it made user "
                f"{made or 'without an id'} for production user {sent}): it predates custom ids and password "
                "hashes on admin create; upgrade it or use --auth-mode direct, and delete that user first."
            )
        hashed = attributes.get("password_hash")
        if self.stored_hash is not None and hashed and await self.stored_hash(UUID(sent)) != hashed:
            raise AuthServerError(
                f"The Auth server at {self.api.url} ignored the password hash sent with admin create "
                f"(user {sent} got another password): upgrade it or use --auth-mode direct."
            )
        self._answer_checked = True

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

    # -- calls ---------------------------------------------------------------------------------

    async def _get(self, user_id: UUID) -> Any:
        """The target user with this id, or None (404)."""
        try:
            return (await self._api(self.admin.get_user_by_id, str(user_id))).user
        except ApiCallError as exc:
            if exc.failure.status == 404:
                return None
            raise

    async def _get_quietly(self, user_id: UUID) -> Any:
        try:
            return await self._retrying(f"looking up user {user_id}")(self._get, user_id)
        except (ApiCallError, ValidationError):
            return None  # the create already failed; this lookup only rescues a hidden success

    async def _api(self, call: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """One admin-API call; any failure but an unparsable 200 becomes an :class:`ApiCallError`
        classified by what the wire saw."""
        exchange = Exchange()
        token = current_exchange.set(exchange)
        try:
            return await call(*args)
        except ValidationError:
            raise
        except Exception as exc:
            raise ApiCallError(failure_of(exc, exchange)) from exc
        finally:
            current_exchange.reset(token)

    def _retrying(self, what: str, *, key_refusals: int = KEY_REFUSALS_RETRIED) -> Any:
        o = self.options
        refusals = 0

        def worth_retrying(exc: BaseException) -> bool:
            nonlocal refusals
            if not isinstance(exc, ApiCallError):
                return False
            if exc.failure.refused_key:
                refusals += 1
                return refusals <= key_refusals
            return exc.failure.transient

        return retrying(
            worth_retrying,
            attempts=o.retry_attempts,
            initial_wait=o.retry_initial_wait,
            max_wait=o.retry_max_wait,
            wait_hint=lambda exc: failure_of(exc).retry_after,
            what=what,
        )


def _is_sso(user: Mapping[str, Any]) -> bool:
    """An SSO user as the list shows it (the list leaves ``is_sso_user`` out): an ``sso:`` provider."""
    app = user.get("app_metadata") or {}
    providers = [app.get("provider"), *(app.get("providers") or [])]
    return bool(user.get("is_sso_user")) or any(str(p or "").startswith("sso:") for p in providers)


def _usage_error(failure: ApiFailure, url: str) -> UsageError:
    if failure.refused_key:
        return UsageError(
            f"The Auth server refused the service-role key ({failure.status} {failure.code or 'refused'}): "
            "check --service-role-key / SUPABASE_SERVICE_ROLE_KEY."
        )
    if failure.transport:
        return UsageError(
            f"The Auth server at {url} did not answer ({failure.message}): check --supabase-url."
        )
    return UsageError(f"The Auth server at {url} answered {failure.line()}: check --supabase-url.")
