"""RFC 9457 problem details: every error the API gives, with a machine-readable `error_code`.

Handlers here replace FastAPI's defaults, so a 404, 405 or 422 looks like every other error and
nothing of the server's inside (a stack trace, SQL, a secret) ever reaches a response.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
# Validation errors named in one answer; the rest are counted, so a huge bad body stays small.
MAX_ERRORS_SHOWN = 20


class ApiErrorCode(StrEnum):
    """Error codes of the API itself; order code refusals use the carrier's own codes."""

    UNAUTHORIZED = "UNAUTHORIZED"
    NOT_FOUND = "NOT_FOUND"
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
    RATE_LIMITED = "RATE_LIMITED"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    VALIDATION_ERROR = "VALIDATION_ERROR"
    NOT_READY = "NOT_READY"
    INTERNAL_ERROR = "INTERNAL_ERROR"


class Problem(BaseModel):
    """An error, as RFC 9457 describes it, with shipmon's `error_code`."""

    type: str = Field("about:blank", description="Always about:blank: `error_code` names it.")
    title: str
    status: int
    detail: str
    error_code: str = Field(description="What went wrong, for machines: e.g. RATE_LIMITED.")
    errors: list[dict[str, Any]] | None = Field(
        None, description="For VALIDATION_ERROR: where the request is wrong, and why."
    )


class ApiProblem(Exception):
    """Raised by routes and dependencies; answered as problem+json."""

    def __init__(
        self,
        status: int,
        error_code: str,
        detail: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.error_code = error_code
        self.detail = detail
        self.headers = headers


_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    404: "Not found",
    405: "Method not allowed",
    413: "Payload too large",
    422: "Validation error",
    429: "Too many requests",
    500: "Internal server error",
    503: "Service unavailable",
}
_CODES = {
    401: ApiErrorCode.UNAUTHORIZED,
    404: ApiErrorCode.NOT_FOUND,
    405: ApiErrorCode.METHOD_NOT_ALLOWED,
    413: ApiErrorCode.PAYLOAD_TOO_LARGE,
    422: ApiErrorCode.VALIDATION_ERROR,
    429: ApiErrorCode.RATE_LIMITED,
}


def problem_response(
    status: int,
    error_code: str,
    detail: str,
    headers: Mapping[str, str] | None = None,
    errors: list[dict[str, Any]] | None = None,
) -> JSONResponse:
    body = Problem(
        title=_TITLES.get(status, "Error"),
        status=status,
        detail=detail,
        error_code=error_code,
        errors=errors,
    )
    return JSONResponse(
        body.model_dump(exclude_none=True),
        status_code=status,
        headers=headers,
        media_type=PROBLEM_JSON,
    )


def _where(error: dict[str, Any]) -> dict[str, Any]:
    # Only where and why: pydantic's `input` would echo (possibly huge) request data back.
    return {"loc": [str(p) for p in error.get("loc", ())], "msg": str(error.get("msg", ""))}


async def _api_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiProblem)
    return problem_response(exc.status, exc.error_code, exc.detail, exc.headers)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    # FastAPI's 400 is a body it could not decode: a validation error like any other.
    status = 422 if exc.status_code == 400 else exc.status_code
    code = _CODES.get(status, ApiErrorCode.VALIDATION_ERROR)
    detail = {
        404: f"nothing at {request.url.path}; see /docs for the API's routes",
        405: f"{request.method} is not allowed on {request.url.path}; see /docs",
        422: "the body is not JSON in UTF-8; see the schema at /docs",
    }.get(status, str(exc.detail))
    return problem_response(status, code, detail, exc.headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    shown = [_where(e) for e in errors[:MAX_ERRORS_SHOWN]]
    more = f" (and {len(errors) - len(shown)} more)" if len(errors) > len(shown) else ""
    return problem_response(
        422,
        ApiErrorCode.VALIDATION_ERROR,
        f"the request is not valid{more}; see `errors` and the schema at /docs",
        errors=shown,
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # The traceback goes to the server's log; the caller learns only that it failed.
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(
        500, ApiErrorCode.INTERNAL_ERROR, "shipmon failed to answer; try again, or tell its ops"
    )


def install(app: FastAPI) -> None:
    """Answer every error of `app` as problem+json."""
    app.add_exception_handler(ApiProblem, _api_problem)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI description of a route's error answers (`model` puts Problem in the
    components; FastAPI lists it under application/json too)."""
    schema = {"schema": {"$ref": "#/components/schemas/Problem"}}
    return {
        s: {"model": Problem, "content": {PROBLEM_JSON: schema}, "description": _TITLES[s]}
        for s in statuses
    }
