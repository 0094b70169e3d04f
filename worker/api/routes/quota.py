"""`/v1/quota`: how the account's API key is spending its carrier day."""

from __future__ import annotations

from fastapi import APIRouter

from worker.api.deps import PrincipalDep, SessionDep, StateDep
from worker.api.problems import responses
from worker.api.schemas import QuotaRow
from worker.quota.limiter import QuotaLimiter

router = APIRouter(prefix="/v1/quota", tags=["quota"])


@router.get("", responses=responses(401, 429))
def quota(principal: PrincipalDep, session: SessionDep, state: StateDep) -> list[QuotaRow]:
    """The account's rows of `shipmon quota --json` (never other accounts', nor the total)."""
    lines = QuotaLimiter(state.redis, state.settings).status(session)
    return [QuotaRow.model_validate(x.as_dict()) for x in lines if x.account == principal.account]
