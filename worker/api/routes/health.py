"""Liveness and readiness, for load balancers and container healthchecks."""

from __future__ import annotations

from typing import Literal

import redis
from fastapi import APIRouter
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from worker.api.deps import SessionDep, StateDep
from worker.api.problems import ApiErrorCode, ApiProblem, responses

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: Literal["ok"] = "ok"


@router.get("/healthz")
def healthz() -> Health:
    """The process answers."""
    return Health()


@router.get("/readyz", responses=responses(503))
def readyz(session: SessionDep, state: StateDep) -> Health:
    """PostgreSQL and Redis both answer."""
    try:
        session.execute(text("SELECT 1"))
    except SQLAlchemyError:
        raise ApiProblem(503, ApiErrorCode.NOT_READY, "PostgreSQL does not answer") from None
    try:
        state.redis.ping()
    except redis.RedisError:
        raise ApiProblem(503, ApiErrorCode.NOT_READY, "Redis does not answer") from None
    return Health()
