"""``/v1/finetunes``: an identity made by fine-tuning its adapter on the photos (the way on a base without a trained
hypernetwork; optional elsewhere). Asynchronous: 202 with a job, then poll it for progress."""

from __future__ import annotations

import time
from typing import Annotated

import anyio
import numpy as np
from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import JSONResponse

from ..deps import EngineDep, StateDep, TenantDep
from ..errors import ApiError
from ..finetune import FinetuneStatus, crop_spec, identity_of
from ..schemas import FinetunePublic, FinetuneStart, PhotoPublic
from ..storage import DEFAULT_TENANT, new_id
from .identities import ERRORS, _photo_rows, read_photos

router = APIRouter(prefix="/v1/finetunes", tags=["finetunes"])


def _public(st: FinetuneStatus, req: dict) -> FinetunePublic:
    """The job as the API shows it: its status and its request (``job.json``)."""
    return FinetunePublic(
        id=st.id, status=st.status, created=st.created, started=st.started, finished=st.finished, step=st.step,
        steps=st.steps, progress=min(1.0, st.step / st.steps) if st.status != "succeeded" else 1.0, loss=st.loss,
        start=req["start"], photos=[PhotoPublic(**r) for r in req["rows"]], identity_id=st.identity_id,
        identity_url=f"/v1/identities/{st.identity_id}" if st.identity_id else None, error=st.error,
    )  # fmt: skip


def _bad(field: str, msg: str) -> ApiError:
    return ApiError(422, "invalid_request", f"{field}: {msg}", details=[{"field": field, "message": msg}])


@router.post("", status_code=202, response_model=FinetunePublic, responses={**ERRORS, 409: ERRORS[404]})
async def create_finetune(
    state: StateDep,
    engine: EngineDep,
    tenant: TenantDep,
    photos: Annotated[list[UploadFile], File(description="1..max_photos face photos of one person")],
    name: Annotated[str, Form(max_length=100, description="optional display name")] = "",
    steps: Annotated[
        int | None, Form(ge=1, le=100_000, description="optimisation steps (default: the recipe's, within the limit)")
    ] = None,
    start: Annotated[
        FinetuneStart, Form(description="auto: from the hypernet's prediction when the server has a trained one")
    ] = "auto",
) -> JSONResponse:
    """Check the photos now (422 as for /v1/identities), then train the identity's adapter with the dataset recipe
    as a job: poll ``GET /v1/finetunes/{id}`` (status, step/steps, loss); the identity appears when it succeeds."""
    s, runner = state.settings, state.finetunes
    n = min(state.recipe.steps, s.max_finetune_steps) if steps is None else steps
    if n > s.max_finetune_steps:
        raise _bad("steps", f"at most {s.max_finetune_steps} on this server, got {n}")
    if start == "prediction" and state.predictor != "trained":
        raise _bad(
            "start", f"'prediction' needs a trained hypernetwork; this server's predictor is {state.predictor!r}"
        )
    if runner.active() >= s.max_finetune_jobs:
        raise ApiError(429, "queue_full", f"{runner.active()} fine-tunes are queued or running; retry later",
                       headers={"Retry-After": "30"})  # fmt: skip
    t0 = time.perf_counter()
    ident, chips, clean, crops, filenames = await read_photos(state, photos, crop_spec(engine.pipe, state.recipe))
    if len(ident.inliers) < 1:  # pragma: no cover - read_photos refuses an upload without a usable face
        raise _bad("photos", "no usable face")
    job_id = new_id("ftj")
    request = {
        "tenant": tenant.name, "name": name, "steps": n,
        "start": "prediction" if start == "auto" and state.predictor == "trained" else
        ("init" if start == "auto" else start), "inliers": list(ident.inliers),
        "rows": _photo_rows(ident, chips, identity_of(job_id), filenames),
        "consistency": round(float(ident.consistency), 4), "consistent": bool(ident.consistent),
        "warnings": list(ident.warnings), "face_backend": ident.backend,
        "seconds_faces": round(time.perf_counter() - t0, 4),
    }  # fmt: skip
    embs = np.stack([ident.photos[i].result.embedding for i in ident.inliers]).astype(np.float32)  # (P, E)
    st = await anyio.to_thread.run_sync(
        runner.create, job_id, request, [crops[i] for i in ident.inliers], chips, clean, embs
    )
    body = _public(st, request).model_dump(mode="json")
    return JSONResponse(body, status_code=202, headers={"Location": f"/v1/finetunes/{st.id}"})


def _job(state, job_id: str, tenant) -> tuple[FinetuneStatus, dict]:
    """The fine-tune's status and request (``job.json``, read once), if ``tenant`` may see it (its own, or any for an
    admin); else 404, as for an unknown id."""
    import json

    st = state.finetunes.get(job_id) if state.finetunes is not None else None
    req = json.loads((state.finetunes.root / st.id / "job.json").read_text()) if st is not None else {}
    if st is None or (tenant.scope is not None and req.get("tenant", DEFAULT_TENANT) != tenant.scope):
        raise ApiError(404, "not_found", f"fine-tune {job_id[:64]!r} not found")
    return st, req


@router.get("/{job_id}", response_model=FinetunePublic, responses=ERRORS)
async def get_finetune(job_id: str, state: StateDep, tenant: TenantDep) -> FinetunePublic:
    """Status, step / steps, last loss; ``identity_id`` once it succeeded."""
    return _public(*_job(state, job_id, tenant))


@router.delete("/{job_id}", response_model=FinetunePublic, responses=ERRORS)
async def cancel_finetune(job_id: str, state: StateDep, tenant: TenantDep) -> FinetunePublic:
    """Cancel a queued or running fine-tune (a running one stops at its next step; nothing is stored)."""
    _, req = _job(state, job_id, tenant)
    return _public(await anyio.to_thread.run_sync(state.finetunes.cancel, job_id), req)
