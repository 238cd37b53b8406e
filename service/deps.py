"""FastAPI dependencies (``Annotated`` aliases) and the one way routes wait for the model worker."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
from typing import Annotated, Any

from fastapi import Depends, Header, Query, Request

from .engine import Engine, EngineClosedError, QueueFullError
from .errors import ApiError
from .middleware import TENANT_SCOPE_KEY
from .state import ServiceState
from .tenants import ANONYMOUS, Tenant


def get_state(request: Request) -> ServiceState:
    return request.app.state.svc


StateDep = Annotated[ServiceState, Depends(get_state)]


def get_engine(state: StateDep) -> Engine:
    """The model worker, or 503 while models load / the server drains."""
    if state.load_error is not None:
        raise ApiError(503, "not_ready", "the models failed to load; see the server log and /readyz")
    if not state.ready or state.engine is None:
        raise ApiError(503, "not_ready", "the models are still loading; retry shortly", headers={"Retry-After": "5"})
    if state.engine.draining:
        raise ApiError(503, "shutting_down", "the server is shutting down")
    return state.engine


EngineDep = Annotated[Engine, Depends(get_engine)]


def submit(fn, *args, **kw) -> cf.Future:
    """Call an ``Engine.submit_*`` and map refusals to HTTP errors (429 + Retry-After, 503)."""
    try:
        return fn(*args, **kw)
    except QueueFullError as e:
        raise ApiError(429, "queue_full", str(e), headers={"Retry-After": str(e.retry_after)}) from None
    except EngineClosedError as e:
        raise ApiError(503, "shutting_down", str(e)) from None


async def wait_for(fut: cf.Future) -> Any:
    """Await a worker future without blocking the event loop (a worker refusal at shutdown is a 503)."""
    try:
        return await asyncio.wrap_future(fut)
    except EngineClosedError as e:
        raise ApiError(503, "shutting_down", str(e)) from None


def get_tenant(request: Request) -> Tenant:
    """The request's tenant (set by the guard middleware from its API key; ``default`` when no key is set up)."""
    return request.scope.get(TENANT_SCOPE_KEY, ANONYMOUS)


TenantDep = Annotated[Tenant, Depends(get_tenant)]


# ---- lists and idempotency (the same parameters on every route that has them) ---------------------------------------
MAX_PAGE = 100  # items per page at most
PageLimit = Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"items per page (1..{MAX_PAGE})")]
PageCursor = Annotated[
    str | None,
    Query(min_length=1, max_length=400, pattern=r"^[A-Za-z0-9_-]+$", description="next_cursor of the previous page"),
]
IdempotencyKey = Annotated[
    str | None,
    Header(min_length=1, max_length=200, pattern=r"\S", description="same key + same request → the same resource"),
]


def bad_cursor() -> ApiError:
    msg = "not a cursor this list returned"
    return ApiError(422, "invalid_request", f"cursor: {msg}", details=[{"field": "cursor", "message": msg}])


def idempotency_mismatch() -> ApiError:
    return ApiError(409, "idempotency_mismatch", "this Idempotency-Key was already used for a different request")
