"""`/v1/shipments`: register, read, list and stop tracking an account's shipments."""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import AwareDatetime

from worker.api.deps import (
    UNAUTHORIZED,
    ApiState,
    PrincipalDep,
    SessionDep,
    hash_of_authorization,
    rate_limited,
)
from worker.api.problems import ApiErrorCode, ApiProblem, responses
from worker.api.schemas import (
    IntakeAnswer,
    RegisterRequest,
    ShipmentDocument,
    ShipmentPage,
    ShipmentSummary,
)
from worker.domain.vocabulary import ErrorCode, validate_order_code
from worker.ops.document import READ_BY_TOKEN
from worker.ops.views import ShipmentNotFound, list_shipments, shipment_story, stop_tracking
from worker.tracking.intake import register_orders

router = APIRouter(prefix="/v1/shipments", tags=["shipments"])

MAX_PAGE = 500
_CURSOR_PREFIX = "after:"
# The same answer for an unknown code and another account's: nothing tells them apart.
_NOT_FOUND = ApiProblem(
    404,
    ErrorCode.ORDERCODE_NOT_FOUND,
    "no shipment with this order code in your account; register it with POST /v1/shipments",
)


def _encode_cursor(order_code: str) -> str:
    return base64.urlsafe_b64encode((_CURSOR_PREFIX + order_code).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> str:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        text = ""
    code = text.removeprefix(_CURSOR_PREFIX)
    if not text.startswith(_CURSOR_PREFIX) or validate_order_code(code) is not None:
        raise ApiProblem(
            422,
            ApiErrorCode.VALIDATION_ERROR,
            "`cursor` is not one this API gave; pass the `next_cursor` of the last page, or none",
        )
    return code


def _checked(order_code: str) -> str:
    # A code no shipment can have is unknown at once, without a database round trip.
    if validate_order_code(order_code) is not None:
        raise _NOT_FOUND
    return order_code


@router.post("", responses=responses(401, 413, 422, 429))
def register(body: RegisterRequest, principal: PrincipalDep, session: SessionDep) -> IntakeAnswer:
    """Register order codes (up to 10,000); refusals carry the carrier's error codes."""
    result = register_orders(session, principal.account, body.order_codes).as_dict()
    session.commit()
    return IntakeAnswer.model_validate(result)


@router.get(
    "/{order_code}",
    response_model=ShipmentDocument,
    responses=responses(401, 404, 429),
    openapi_extra={"security": [{"HTTPBearer": []}]},
)
async def read(order_code: str, request: Request) -> Response:
    """One shipment's whole story: the document of `shipmon show CODE --json`."""
    # The busiest route takes no injected dependencies: each costs a few percent of a read.
    state: ApiState = request.app.state.shipmon
    token_hash = hash_of_authorization(request.headers.get("authorization"))
    wait = await state.limiter.retry_after_async(token_hash)
    if wait is not None:
        raise rate_limited(state.limiter, wait)
    # A code no shipment can have finds nothing, after the token is checked like any other.
    code = order_code if validate_order_code(order_code) is None else ""
    async with state.reads.connection() as conn:
        cursor = await conn.execute(READ_BY_TOKEN, {"token_hash": token_hash, "order_code": code})
        found = await cursor.fetchone()
    if found is None:
        raise UNAUTHORIZED
    if found[1] is None:
        raise _NOT_FOUND
    # PostgreSQL built the document; it goes out as it came, never parsed here.
    return Response(found[1], media_type="application/json")


@router.get("", responses=responses(401, 422, 429))
def list_(
    principal: PrincipalDep,
    session: SessionDep,
    status: Annotated[
        str | None,
        # Every spelling of a status is ASCII letters, digits and underscores; anything else
        # (a NUL byte, which PostgreSQL cannot even compare) is refused before it reaches SQL.
        Query(
            max_length=40,
            pattern=r"^[A-Za-z0-9_]+$",
            description="A status: English name, carrier ID or Vietnamese code.",
        ),
    ] = None,
    changed_since: Annotated[
        AwareDatetime | None,
        Query(description="ISO-8601 with offset: registered, changed status or scanned since."),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    cursor: Annotated[
        str | None, Query(max_length=64, description="`next_cursor` of the previous page.")
    ] = None,
) -> ShipmentPage:
    """The account's shipments by order code, a page at a time (keyset pagination)."""
    rows: list[dict[str, Any]] = list_shipments(
        session,
        principal.account_id,
        status=status,
        changed_since=changed_since,
        after=_decode_cursor(cursor) if cursor is not None else None,
        limit=limit,
    )
    next_cursor = _encode_cursor(rows[-1]["order_code"]) if len(rows) == limit else None
    return ShipmentPage(
        shipments=[ShipmentSummary.model_validate(r) for r in rows], next_cursor=next_cursor
    )


@router.delete("/{order_code}", responses=responses(401, 404, 429))
def stop(order_code: str, principal: PrincipalDep, session: SessionDep) -> ShipmentDocument:
    """Stop tracking: polling ends and `shipment.polling_stopped` (`stopped_by_merchant`) goes
    out to the account's endpoints, by the delivery sweep within seconds."""
    try:
        stop_tracking(session, _checked(order_code), principal.account, datetime.now(UTC))
        story = shipment_story(session, order_code, principal.account)
    except ShipmentNotFound:
        raise _NOT_FOUND from None
    session.commit()
    return ShipmentDocument.model_validate(story.as_dict())
