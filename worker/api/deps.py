"""What routes take as typed dependencies: the request's database session and its principal."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import redis
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from worker.api.limits import RateLimiter
from worker.api.problems import ApiErrorCode, ApiProblem
from worker.api.tokens import Principal, verify_token
from worker.core.config import Settings
from worker.scheduling.learning import PlanCache


@dataclass(frozen=True)
class ApiState:
    """What one API process keeps between requests."""

    settings: Settings
    sessions: sessionmaker[Session]
    redis: redis.Redis[Any]
    limiter: RateLimiter
    # What applying a carrier push needs: the scheduler's plan, and the key of API key digests.
    plans: PlanCache
    secret_key: str


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
_UNAUTHORIZED = ApiProblem(
    401,
    ApiErrorCode.UNAUTHORIZED,
    "send `Authorization: Bearer <token>` with a token from `shipmon token create ACCOUNT`",
    headers={"WWW-Authenticate": "Bearer"},
)


def get_principal(
    session: SessionDep,
    state: StateDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The account a valid, unrevoked token acts for, within the token's rate limit."""
    if credentials is None:
        raise _UNAUTHORIZED
    principal = verify_token(session, credentials.credentials)
    if principal is None:
        raise _UNAUTHORIZED
    wait = state.limiter.retry_after(principal.token_id)
    if wait is not None:
        raise ApiProblem(
            429,
            ApiErrorCode.RATE_LIMITED,
            f"more than {state.limiter.per_second} requests per second with this token; "
            "wait for Retry-After seconds",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]
