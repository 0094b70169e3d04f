"""What routes take as typed dependencies: the request's database session and its principal."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import redis
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from psycopg_pool import AsyncConnectionPool
from sqlalchemy.orm import Session, sessionmaker

from worker.api.limits import RateLimiter
from worker.api.problems import ApiErrorCode, ApiProblem
from worker.api.tokens import Principal, presented_token_hash, verify_token
from worker.core.config import Settings
from worker.scheduling.learning import PlanCache

if TYPE_CHECKING:
    from worker.api.routes.carrier import PushBatcher


@dataclass(frozen=True)
class ApiState:
    """What one API process keeps between requests."""

    settings: Settings
    sessions: sessionmaker[Session]
    # The hot read runs on the event loop, on connections of its own (opened at start-up).
    reads: AsyncConnectionPool
    redis: redis.Redis[Any]
    limiter: RateLimiter
    # What applying a carrier push needs: the scheduler's plan, and the key of API key digests.
    plans: PlanCache
    secret_key: str
    # Starts delivering committed events at once (the delivery sweep is the safety net).
    deliver: Callable[[list[int]], None]
    # Applies carrier pushes in batches.
    pushes: PushBatcher


async def get_state(request: Request) -> ApiState:
    # Async, though it awaits nothing: FastAPI would run a plain def in its threadpool.
    state: ApiState = request.app.state.shipmon
    return state


StateDep = Annotated[ApiState, Depends(get_state)]


def get_session(state: StateDep) -> Iterator[Session]:
    """A session for the request; routes that write commit before they answer."""
    with state.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]

_bearer = HTTPBearer(auto_error=False, description="A token from `shipmon token create`.")
UNAUTHORIZED = ApiProblem(
    401,
    ApiErrorCode.UNAUTHORIZED,
    "send `Authorization: Bearer <token>` with a token from `shipmon token create ACCOUNT`",
    headers={"WWW-Authenticate": "Bearer"},
)


async def get_token_hash(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The hash of the presented token; 401 when there is none or it cannot be one of ours."""
    digest = presented_token_hash(credentials.credentials) if credentials is not None else None
    if digest is None:
        raise UNAUTHORIZED
    return digest


TokenHashDep = Annotated[str, Depends(get_token_hash)]


def hash_of_authorization(header: str | None) -> str:
    """`get_token_hash` for a route that reads its own header (the hot read, which skips
    dependency injection): the same parsing as HTTPBearer's, the same 401."""
    scheme, _, token = (header or "").partition(" ")
    digest = presented_token_hash(token) if scheme.lower() == "bearer" else None
    if digest is None:
        raise UNAUTHORIZED
    return digest


def rate_limited(limiter: RateLimiter, wait: float) -> ApiProblem:
    return ApiProblem(
        429,
        ApiErrorCode.RATE_LIMITED,
        f"more than {limiter.per_second} requests per second with this token; "
        "wait for Retry-After seconds",
        headers={"Retry-After": str(max(1, math.ceil(wait)))},
    )


def get_principal(session: SessionDep, state: StateDep, token_hash: TokenHashDep) -> Principal:
    """The account a valid, unrevoked token acts for, within the token's rate limit."""
    wait = state.limiter.retry_after(token_hash)
    if wait is not None:
        raise rate_limited(state.limiter, wait)
    principal = verify_token(session, token_hash)
    if principal is None:
        raise UNAUTHORIZED
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]
