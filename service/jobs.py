"""Batch jobs: persisted in SQLite, run item by item through the model worker, resumed after a restart.

Exactly once: an item's images are written under deterministic names and recorded in the same transaction that
marks the item done (``Storage.complete_item``). A server stopped or killed mid-item leaves the item pending; the
next start re-runs it and overwrites the same files and rows, so every result is present exactly once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time

import anyio

from .engine import EngineClosedError, QueueFullError
from .errors import ApiError
from .schemas import MAX_SEED, JobRequest
from .state import ServiceState

log = logging.getLogger("difflora.jobs")


def request_hash(req: JobRequest) -> str:
    return hashlib.sha256(json.dumps(req.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def job_items(req: JobRequest) -> list[tuple[str, str, int]]:
    """(identity, prompt, first seed) for every identity × prompt; item i uses seeds seed + i·num_images + k."""
    items = []
    for ident in req.identity_ids:
        for prompt in req.prompts:
            items.append((ident, prompt, (req.seed + len(items) * req.num_images) % (MAX_SEED + 1)))
    return items


class JobRunner:
    """One asyncio task: picks the oldest active job and runs its pending items, one model request at a time (so
    interactive requests are never starved by a big batch)."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="difflora-jobs")

    def notify(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        """Finish the item in flight, then stop (the rest stays pending for the next start)."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=self.state.settings.drain_timeout_s + 5)
            except (TimeoutError, asyncio.CancelledError):
                pass

    async def _loop(self) -> None:
        st = self.state
        while not self._stopping:
            if not st.ready:
                await asyncio.sleep(0.1)
                continue
            try:
                ids = await anyio.to_thread.run_sync(st.storage.active_jobs)
                for job_id in ids:
                    if self._stopping:
                        return
                    await self._run_job(job_id)
            except Exception:  # noqa: BLE001 - the runner must survive a bad job
                log.exception("job runner error")
                await asyncio.sleep(1.0)
                continue
            if not ids:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=1.0)
                except TimeoutError:
                    pass

    async def _run_job(self, job_id: str) -> None:
        from .routes.generations import encode_png, resolve_params

        st, storage = self.state, self.state.storage
        job = await anyio.to_thread.run_sync(storage.get_job, job_id)
        req = JobRequest.model_validate(job["request"])
        if not await anyio.to_thread.run_sync(
            lambda: storage.set_job_status(job_id, "running", only_from=("queued", "running"))
        ):
            return
        try:
            params = resolve_params(req.settings, st.settings, st.engine)
        except ApiError as e:  # e.g. a job queued before a restart with lower limits: fail it, run the next one
            await anyio.to_thread.run_sync(self._fail_job, job_id, f"settings: {e.detail}")
            return
        for item in await anyio.to_thread.run_sync(storage.pending_items, job_id):
            if self._stopping or storage.job_status(job_id) == "canceled":
                return
            idx, ident = item["idx"], item["identity_id"]
            t0 = time.perf_counter()
            if not storage.identity_exists(ident):
                await anyio.to_thread.run_sync(storage.fail_item, job_id, idx, "identity not found", 0.0)
                continue
            seeds = [(item["seed"] + k) % (MAX_SEED + 1) for k in range(req.num_images)]
            while True:
                try:
                    fut = st.engine.submit_generate(ident, params, [item["prompt"]] * len(seeds), seeds)
                    break
                except QueueFullError:
                    await asyncio.sleep(0.2)
                except EngineClosedError:
                    return
            try:
                out = await asyncio.wrap_future(fut)
            except EngineClosedError:
                return
            except Exception as e:  # noqa: BLE001 - recorded on the item
                if not storage.identity_exists(ident):  # deleted while the item waited in the model queue
                    await anyio.to_thread.run_sync(storage.fail_item, job_id, idx, "identity not found", 0.0)
                    continue
                log.exception("job %s item %d failed", job_id, idx)
                await anyio.to_thread.run_sync(storage.fail_item, job_id, idx, f"{type(e).__name__}", 0.0)
                continue
            pngs = await anyio.to_thread.run_sync(encode_png, out.images)
            dt = time.perf_counter() - t0
            await anyio.to_thread.run_sync(storage.complete_item, job_id, idx, pngs, seeds, dt)
        job = await anyio.to_thread.run_sync(storage.get_job, job_id)
        if job["done"] + job["failed"] < job["total"]:
            return  # canceled or stopping
        if job["failed"]:
            status, err = "failed", f"{job['failed']} of {job['total']} items failed"
        else:
            status, err = "succeeded", None
        await anyio.to_thread.run_sync(lambda: storage.set_job_status(job_id, status, err, only_from=("running",)))

    def _fail_job(self, job_id: str, error: str) -> None:
        """Fail every pending item of a job that cannot run, then the job, with ``error``."""
        storage = self.state.storage
        for item in storage.pending_items(job_id):
            storage.fail_item(job_id, item["idx"], error, 0.0)
        storage.set_job_status(job_id, "failed", error, only_from=("running",))
