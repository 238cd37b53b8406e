"""``/v1/jobs``: batch personalization (identities × prompts), persisted, with progress, results and cancel."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import APIRouter, Path
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from ..deps import (
    IdempotencyKey,
    PageCursor,
    PageLimit,
    StateDep,
    TenantDep,
    bad_cursor,
    idempotency_mismatch,
)
from ..errors import ApiError, error_body
from ..jobs import job_items, request_hash
from ..routes.generations import resolve_params
from ..schemas import JobList, JobPublic, JobRequest, JobResultPublic, JobResultsPublic
from ..storage import new_id
from .identities import ERRORS

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
ACTIVE = ("queued", "running")  # job states that can still change; every other state is final


def _public(job: dict) -> JobPublic:
    total, finished = job["total"], job["done"] + job["failed"]
    eta = None
    if job["status"] in ACTIVE and job["seconds_per_item"] is not None:
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


def _sse(event: str, data: dict, event_id: int) -> str:
    return f"event: {event}\nid: {event_id}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _job_events(state, first: dict, tenant) -> AsyncIterator[str]:
    """The job as SSE: ``progress`` whenever status / done / failed change, ``end`` once it is final; keep-alive
    comments in between; ``gone`` (an error body) if the job disappears. Reads the job only through ``_job`` (the
    storage's public ``get_job``)."""
    s = state.settings
    job, last, n = first, None, 0
    sent = time.monotonic()
    state.event_streams += 1  # here, not in the route: a stream never started never reaches the finally
    try:
        while True:
            pub = _public(job).model_dump(mode="json")
            key = (pub["status"], pub["done"], pub["failed"])
            if key != last:
                n += 1
                final = pub["status"] not in ACTIVE
                yield _sse("end" if final else "progress", pub, n)
                last, sent = key, time.monotonic()
                if final:
                    return
            elif time.monotonic() - sent >= s.job_events_keepalive_s:
                yield ": keep-alive\n\n"  # also how a client that left is noticed: the write fails
                sent = time.monotonic()
            await asyncio.sleep(s.job_events_poll_s)
            try:
                job = await _job(state, first["id"], tenant)
            except ApiError as e:  # the job is gone
                yield _sse("gone", error_body(e.code, e.detail), n + 1)
                return
    finally:
        state.event_streams -= 1


@router.get(
    "/{job_id}/events", response_class=StreamingResponse,
    responses={**ERRORS, 200: {"content": {"text/event-stream": {}},
                               "description": "`progress` events (a JobPublic each), then one `end` event"}},
)  # fmt: skip
async def job_events(job_id: str, state: StateDep, tenant: TenantDep) -> StreamingResponse:
    """Job progress as Server-Sent Events: one ``progress`` event (data: the job as in ``GET /v1/jobs/{id}``) per
    change of status / done / failed, a final ``end`` event when the job is no longer queued or running, and
    ``: keep-alive`` comments while nothing changes. The stream ends after ``end`` or when the client leaves; about
    ``max_event_streams`` streams at once (429 beyond)."""
    first = await _job(state, job_id, tenant)
    if state.event_streams >= state.settings.max_event_streams:
        raise ApiError(
            429, "too_many_streams", f"at most {state.settings.max_event_streams} event streams at once; poll "
            f"GET /v1/jobs/{{id}} instead or retry later", headers={"Retry-After": "5"},
        )  # fmt: skip
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(_job_events(state, first, tenant), media_type="text/event-stream", headers=headers)


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
