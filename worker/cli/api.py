"""`shipmon api`: the HTTP API for merchant backends, on uvicorn."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from worker.cli.common import servers, settings


def serve_api(host: str, port: int, workers: int) -> None:
    """Serve the API until interrupted; worker processes find the servers in the environment."""
    import uvicorn

    from worker.cli.run import system_env
    from worker.core.logs import logging_config

    os.environ.update(system_env(servers()))
    uvicorn.run(
        "worker.runtime.api:from_environment",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=settings().log_level.lower(),
        log_config=logging_config(settings().log_level),
        server_header=False,
        # The access log shows method, path and status; never a header, so never a token.
        access_log=True,
    )


def api(
    host: Annotated[
        str, typer.Option(help="Address to listen on; 0.0.0.0 inside a container.")
    ] = "127.0.0.1",
    port: Annotated[
        int | None, typer.Option(help="Port to listen on [default: SHIPMON_API_PORT]")
    ] = None,
    workers: Annotated[int, typer.Option(help="Processes answering requests.", min=1)] = 1,
) -> None:
    """Serve the HTTP API (FastAPI on uvicorn); OpenAPI at /openapi.json, docs at /docs."""
    serve_api(host, settings().api_port if port is None else port, workers)
