"""FastAPI dependencies (``Annotated`` aliases) and the one way routes wait for the model worker."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
from typing import Annotated, Any

from fastapi import Depends, Request

from .engine import Engine, EngineClosedError, QueueFullError
from .errors import ApiError
from .state import ServiceState


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
