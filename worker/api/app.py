"""The ASGI application: `create_app(settings)`, served by `shipmon api` on uvicorn."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import redis
import redis.asyncio
from fastapi import FastAPI
from psycopg_pool import AsyncConnectionPool

from worker.api import problems
from worker.api.deps import ApiState
from worker.api.limits import BodyLimit, RateLimiter
from worker.api.routes import carrier, health, quota, shipments
from worker.carrier.push import MAX_PUSH_BYTES
from worker.core.config import Settings
from worker.core.db import libpq_url, session_factory
from worker.core.servers import resolve
from worker.ops.rotation import store_api_key_digests
from worker.scheduling.learning import PlanCache

DESCRIPTION = """\
Register 247Express order codes and read what the carrier says about them, from any language.
Authenticate with `Authorization: Bearer <token>`; create a token with
`shipmon token create ACCOUNT`. Errors are RFC 9457 `application/problem+json` with an
`error_code`.
"""


def _left_to_the_sweep(event_ids: list[int]) -> None:
    """No worker to wake: the delivery sweep finds the events within seconds."""


def create_app(
    settings: Settings, deliver: Callable[[list[int]], None] = _left_to_the_sweep
) -> FastAPI:
    """The API, on the servers the settings name (or the embedded ones). `deliver` is given
    the ids of events a request committed, to start their delivery."""
    servers = resolve(settings)
    client: redis.Redis[Any] = redis.Redis.from_url(servers.redis_url)
    aclient: redis.asyncio.Redis[Any] = redis.asyncio.Redis.from_url(servers.redis_url)
    # Reads answer on the event loop; autocommit, so a read is one round trip.
    reads = AsyncConnectionPool(
        libpq_url(servers.database_url),
        min_size=2,
        max_size=10,
        open=False,
        kwargs={"autocommit": True, "connect_timeout": 10},
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await reads.open(wait=False)
        try:
            yield
        finally:
            await reads.close()
            await aclient.aclose()  # type: ignore[attr-defined]  # (redis 5+; stubs are older)

    app = FastAPI(title="shipmon", version="1", description=DESCRIPTION, lifespan=lifespan)
    sessions = session_factory(servers.database_url)
    old_keys = [k.get_secret_value() for k in settings.old_secret_keys]
    # Accounts added before pushes were received get the digest a push finds them by.
    store_api_key_digests(sessions, servers.secret_key, old_keys, every=False)
    app.state.shipmon = ApiState(
        settings=settings,
        sessions=sessions,
        reads=reads,
        redis=client,
        limiter=RateLimiter(client, aclient, settings.api_rate_limit),
        plans=PlanCache(settings.quota_timezone),
        secret_key=servers.secret_key,
        deliver=deliver,
        pushes=carrier.PushBatcher(),
    )
    problems.install(app)
    app.include_router(shipments.router)
    app.include_router(quota.router)
    app.include_router(health.router)
    app.include_router(carrier.router)
    app.add_middleware(BodyLimit)
    # Added last, so it runs first: a push over its own limit is refused in the carrier's shape.
    app.add_middleware(carrier.PushBodyLimit, limit=MAX_PUSH_BYTES)
    return app
