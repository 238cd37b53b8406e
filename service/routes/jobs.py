"""``/v1/jobs``: batch personalization (identities × prompts), persisted, with progress, results and cancel."""

from __future__ import annotations

from typing import Annotated

import anyio
from fastapi import APIRouter, Path
from fastapi.responses import FileResponse, JSONResponse

from ..deps import (
    IdempotencyKey,
    PageCursor,
    PageLimit,
    StateDep,
    TenantDep,
    bad_cursor,
    idempotency_mismatch,
)
from ..errors import ApiError
from ..jobs import job_items, request_hash
from ..routes.generations import resolve_params
from ..schemas import JobList, JobPublic, JobRequest, JobResultPublic, JobResultsPublic
from ..storage import new_id
from .identities import ERRORS

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def _public(job: dict) -> JobPublic:
    total, finished = job["total"], job["done"] + job["failed"]
    eta = None
    if job["status"] in ("queued", "running") and job["seconds_per_item"] is not None:
        eta = round(job["seconds_per_item"] * (total - finished), 2)
    return JobPublic(
        id=job["id"], status=job["status"], tenant=job["tenant"],
        created=job["created"], started=job["started"], finished=job["finished"],
        total=total, done=job["done"], failed=job["failed"], progress=finished / total if total else 1.0,
        eta_seconds=eta, error=job["error"], results_url=f"/v1/jobs/{job['id']}/results",
    )  # fmt: skip


async def _job(state, job_id: str, tenant) -> dict:
    """The job, if ``tenant`` may see it; else 404, the same as for an id that does not exist."""
    job = await anyio.to_thread.run_sync(state.storage.get_job, job_id, tenant.scope)
    if job is None:
        raise ApiError(404, "not_found", f"job {job_id[:64]!r} not found")
    return job


@router.post(
    "", status_code=202, response_model=JobPublic,
    responses={**ERRORS, 200: {"model": JobPublic, "description": "existing job for this Idempotency-Key"},
               409: ERRORS[404]},
)  # fmt: skip
async def create_job(req: JobRequest, state: StateDep, tenant: TenantDep, idempotency_key: IdempotencyKey = None):
    """Queue a batch job: every identity × every prompt. Replays with the same ``Idempotency-Key`` return it."""
    s = state.settings
    resolve_params(req.settings, s, state.engine)  # limits, now rather than at run time
    items = job_items(req)
    if len(items) * req.num_images > s.max_job_items:
        msg = f"a job makes at most {s.max_job_items} images, this one {len(items) * req.num_images}"
        raise ApiError(422, "limit_exceeded", msg, details=[{"field": "body", "message": msg}])
    missing = [i for i in dict.fromkeys(req.identity_ids) if not state.storage.identity_exists(i, tenant.scope)]
    if missing:
        raise ApiError(404, "not_found", f"identity {missing[0][:64]!r} not found ({len(missing)} missing)")
    try:
        job_id, created = await anyio.to_thread.run_sync(
            state.storage.create_job, new_id("job"), req.model_dump(mode="json"), request_hash(req), items,
            idempotency_key, tenant.name,
        )  # fmt: skip
    except ValueError:
        raise idempotency_mismatch() from None
    if state.jobs is not None:
        state.jobs.notify()
    body = _public(await _job(state, job_id, tenant)).model_dump(mode="json")
    return JSONResponse(body, status_code=202 if created else 200, headers={"Location": f"/v1/jobs/{job_id}"})


@router.get("", response_model=JobList, responses=ERRORS)
async def list_jobs(state: StateDep, tenant: TenantDep, limit: PageLimit = 20, cursor: PageCursor = None) -> JobList:
    """The caller's jobs (an admin key: everyone's), oldest first, ``limit`` per page; follow ``next_cursor``."""
    try:
        page, nxt = await anyio.to_thread.run_sync(state.storage.list_jobs, limit, cursor, tenant.scope)
    except ValueError:
        raise bad_cursor() from None
    return JobList(items=[_public(j) for j in page], next_cursor=nxt)


@router.get("/{job_id}", response_model=JobPublic, responses=ERRORS)
async def get_job(job_id: str, state: StateDep, tenant: TenantDep) -> JobPublic:
    """Status, progress (done/total) and ETA."""
    return _public(await _job(state, job_id, tenant))


@router.delete("/{job_id}", response_model=JobPublic, responses=ERRORS)
async def cancel_job(job_id: str, state: StateDep, tenant: TenantDep) -> JobPublic:
    """Cancel a queued or running job (the item in flight finishes; finished jobs are left as they are)."""
    await _job(state, job_id, tenant)
    await anyio.to_thread.run_sync(
        lambda: state.storage.set_job_status(job_id, "canceled", only_from=("queued", "running"))
    )
    return _public(await _job(state, job_id, tenant))


@router.get("/{job_id}/results", response_model=JobResultsPublic, responses=ERRORS)
async def job_results(
    job_id: str, state: StateDep, tenant: TenantDep, limit: PageLimit = 20, cursor: PageCursor = None
) -> JobResultsPublic:
    """The job's items in order, ``limit`` per page (follow ``next_cursor``), with their image URLs (finished
    items only have images)."""
    job = await _job(state, job_id, tenant)
    try:
        rows, nxt = await anyio.to_thread.run_sync(state.storage.job_results, job_id, limit, cursor)
    except ValueError:
        raise bad_cursor() from None
    items: dict[int, JobResultPublic] = {}
    for r in rows:
        it = items.get(r["idx"])
        if it is None:
            it = items[r["idx"]] = JobResultPublic(
                index=r["idx"], identity_id=r["identity_id"], prompt=r["prompt"], status=r["status"],
                error=r["error"], images=[],
            )  # fmt: skip
        if r["k"] is not None:
            it.images.append(
                {"k": r["k"], "seed": r["seed"], "url": f"/v1/jobs/{job_id}/results/{r['idx']}/{r['k']}.png"}
            )
    return JobResultsPublic(id=job_id, status=job["status"], results=list(items.values()), next_cursor=nxt)


@router.get(
    "/{job_id}/results/{index}/{k}.png", responses={**ERRORS, 200: {"content": {"image/png": {}}}},
    response_class=FileResponse,
)  # fmt: skip
async def job_result_image(
    job_id: str,
    index: Annotated[int, Path(ge=0, le=10**6)],
    k: Annotated[int, Path(ge=0, le=1000)],
    state: StateDep,
    tenant: TenantDep,
) -> FileResponse:
    """One result image."""
    path = await anyio.to_thread.run_sync(state.storage.result_file, job_id, index, k, tenant.scope)
    if path is None or not path.is_file():
        raise ApiError(404, "not_found", "no such result")
    return FileResponse(path, media_type="image/png")
