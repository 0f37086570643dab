"""Bearer tokens: who is asking, and slowing down whoever keeps guessing.

Tokens are looked up by their SHA-256 hash; a hit is kept in memory for `CACHE_SECONDS`
so a busy approver's page does not cost a query per request. A revoked or expired
token therefore stops working within that time.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select

from gateway.approvals import Principal
from gateway.cli_tokens import TOKEN_PREFIX, hash_token
from quarantine.accounts import Role
from quarantine.db import Store
from quarantine.models import Token, User

CACHE_SECONDS = 5.0
MAX_FAILURES = 10  # per client address per FAILURE_WINDOW, then 429 until they age out
FAILURE_WINDOW = 60.0
QUERY_TOKEN_NAMES = frozenset({"token", "access_token", "api_key", "apikey", "bearer"})

bearer = HTTPBearer(auto_error=False, description="An API token from `sekisho tokens create`")


class FailureThrottle:
    """Failed authentications per client address in a sliding window."""

    def __init__(
        self,
        limit: int = MAX_FAILURES,
        window: float = FAILURE_WINDOW,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limit = limit
        self._window = window
        self._monotonic = monotonic
        self._failures: dict[str, deque[float]] = {}

    def retry_after(self, address: str) -> float:
        """Seconds until this address may try again; 0 when it may now."""
        failures = self._failures.get(address)
        if not failures:
            return 0.0
        now = self._monotonic()
        while failures and failures[0] <= now - self._window:
            failures.popleft()
        if not failures:
            del self._failures[address]
            return 0.0
        if len(failures) < self._limit:
            return 0.0
        return failures[0] + self._window - now

    def failed(self, address: str) -> None:
        self._failures.setdefault(address, deque(maxlen=self._limit)).append(self._monotonic())


@dataclass(frozen=True, slots=True)
class _Cached:
    principal: Principal
    expires_at: datetime | None
    kept_until: float


class Authenticator:
    def __init__(self, store: Store, clock: Callable[[], datetime]) -> None:
        self._store = store
        self._clock = clock
        self._cache: dict[str, _Cached] = {}
        self.throttle = FailureThrottle()

    async def principal(self, token: str) -> Principal | None:
        if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            return None
        digest = hash_token(token)
        now = self._clock()
        cached = self._cache.get(digest)
        if cached is None or cached.kept_until < time.monotonic():
            cached = await self._load(digest)
        if cached is None or (cached.expires_at is not None and cached.expires_at <= now):
            self._cache.pop(digest, None)
            return None
        return cached.principal

    async def _load(self, digest: str) -> _Cached | None:
        async with self._store.read() as session:
            row = (
                await session.execute(
                    select(Token, User)
                    .join(User, User.id == Token.user_id)
                    .where(Token.token_hash == digest)
                )
            ).first()
        if row is None:
            return None
        token, user = row
        if token.revoked_at is not None or user.disabled or user.role not in set(Role):
            return None
        principal = Principal(
            name=user.name,
            role=Role(user.role),
            groups=tuple(str(g) for g in user.groups),
            emails=tuple(str(e).lower() for e in user.emails),
            token_prefix=token.prefix,
        )
        cached = _Cached(principal, token.expires_at, time.monotonic() + CACHE_SECONDS)
        self._cache[digest] = cached
        return cached


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"})


async def current_user(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    # A token in a URL ends up in proxy logs, browser history and Referer headers.
    for name, value in request.query_params.multi_items():
        if name.lower() in QUERY_TOKEN_NAMES or value.startswith(TOKEN_PREFIX):
            raise HTTPException(400, "send the token in the Authorization header, not the URL")
    authenticator: Authenticator = request.app.state.authenticator
    address = client_address(request)
    wait = authenticator.throttle.retry_after(address)
    if wait > 0:
        raise HTTPException(
            429,
            "too many failed authentications from this address; try again later",
            headers={"Retry-After": str(math.ceil(wait))},
        )
    if credentials is None:
        raise _unauthorized("an `Authorization: Bearer <token>` header is required")
    principal = await authenticator.principal(credentials.credentials)
    if principal is None:
        authenticator.throttle.failed(address)
        raise _unauthorized("the token is not valid (unknown, revoked or expired)")
    return principal


CurrentUser = Annotated[Principal, Depends(current_user)]


def require_roles(*roles: Role) -> Callable[[Principal], Principal]:
    allowed = frozenset(roles)

    def check(user: CurrentUser) -> Principal:
        if user.role not in allowed:
            names = ", ".join(sorted(r.value for r in allowed))
            raise HTTPException(403, f"this needs one of the roles: {names}")
        return user

    return check
