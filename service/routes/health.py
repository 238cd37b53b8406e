"""Liveness, readiness (models loaded and warmed up) and Prometheus metrics."""

from __future__ import annotations

import anyio
from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..deps import StateDep
from ..errors import error_body
from ..schemas import HealthPublic

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthPublic)
async def healthz() -> HealthPublic:
    """Liveness: the process answers."""
    return HealthPublic(status="ok")


@router.get("/readyz", response_model=HealthPublic, responses={503: {"description": "loading, failed or draining"}})
async def readyz(state: StateDep):
    """Ready once the models are loaded and one warm-up generation ran; 503 while loading or shutting down."""
    eng = state.engine
    details = {
        "base_model": state.base_model,
        "face_backend": state.settings.face_backend,
        "predictor_trained": state.predictor_trained,
        "predictor": state.predictor,
        "predictor_message": state.predictor_message,
        "personalization": (["predict"] if state.predictor != "none" else []) + ["finetune"],
        "warnings": state.warnings,
        "timings": {k: round(v, 3) for k, v in state.timings.items()},
        "queue_depth": eng.queue_depth if eng else 0,
        "cached_adapters": len(eng.cached()) if eng else 0,
        "replica": state.storage.owner,  # the id job leases name (jobs.lease_owner)
        "database": state.storage.engine.dialect.name,  # sqlite | postgresql
    }
    if eng is not None and eng.draining:
        return JSONResponse({**error_body("shutting_down", "draining"), "details": details}, status_code=503)
    if state.load_error is not None:
        body = error_body("load_failed", f"the models failed to load: {state.load_error.split(':')[0]}")
        return JSONResponse({**body, "details": details}, status_code=503)
    if not state.ready:
        return JSONResponse({**error_body("not_ready", "loading models"), "details": details}, status_code=503)
    return HealthPublic(status="ready", details=details)


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(state: StateDep) -> Response:
    """Prometheus text format: requests, latencies, queue depth, jobs by state, predict/apply/step seconds."""
    m = state.metrics
    counts = await anyio.to_thread.run_sync(state.storage.jobs_by_state)
    for k, v in counts.items():
        m.jobs.labels(k).set(v)
    if state.engine is not None:
        m.queue_depth.set(state.engine.queue_depth)
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
