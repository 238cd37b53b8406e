"""Batch jobs: persisted in the database, claimed with a lease, run item by item through the model worker.

Several replicas may share one database: each runner claims the oldest job that is queued or whose lease expired
(``Storage.claim_job``), renews its lease while it runs (a heartbeat every third of ``job_lease_s``), and gives the
job back to the queue when it stops gracefully. A replica that dies stops renewing; after the lease expires
another replica takes the job over and runs the items still pending.

Exactly once: an item's images are written under deterministic names and recorded (an upsert keyed by job, item
and image) in the same transaction that marks the item done (``Storage.complete_item``). An item in flight when its
replica died is still pending; the replica that takes over re-runs it and overwrites the same files and rows, so
every result is present exactly once.
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
from .storage import SWEEP_GRACE_S

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


POLL_S = 1.0  # how often an idle runner looks for work another replica queued (its own are notified at once)
SWEEP_EVERY_S = 600.0  # how often a replica removes old leftovers of interrupted writes (Storage.sweep)
RETENTION_EVERY_S = 60.0  # how often expired identities are deleted (more often for a retention under 4 minutes)


def retention_interval(retention_s: float) -> float:
    """Seconds between retention sweeps: a quarter of the period, at most ``RETENTION_EVERY_S``, at least 0.25."""
    return max(0.25, min(RETENTION_EVERY_S, retention_s / 4))


class JobRunner:
    """One asyncio task: claims a job and runs its pending items, one model request at a time (so interactive
    requests are never starved by a big batch); a second task renews the leases; a third, with a retention period
    set, deletes identities nobody used for that long."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task | None = None
        self._beat_task: asyncio.Task | None = None
        self._retention_task: asyncio.Task | None = None
        self._lost: set[str] = set()  # jobs whose lease this replica lost (taken over, canceled, finished)
        self._current: str | None = None  # the job being run

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="difflora-jobs")
        self._beat_task = asyncio.create_task(self._beat(), name="difflora-leases")
        if self.state.settings.identity_retention_s is not None:
            self._retention_task = asyncio.create_task(self._retention(), name="difflora-retention")

    def notify(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        """Finish the item in flight, give the job back to the queue (another replica takes it at once), stop."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=self.state.settings.drain_timeout_s + 5)
            except (TimeoutError, asyncio.CancelledError):
                pass
        for task in (self._beat_task, self._retention_task):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass

    async def _retention(self) -> None:
        """Delete identities unused for ``identity_retention_s`` (every replica may run it: deletes are
        idempotent), and drop them from memory."""
        period = float(self.state.settings.identity_retention_s)
        while True:
            await asyncio.sleep(retention_interval(period))
            try:
                gone = await anyio.to_thread.run_sync(self.state.storage.expire_identities, period)
                for identity_id in gone:
                    self.state.forget_identity(identity_id)
                if gone:
                    log.info("retention: deleted %d identities unused for %.0f s", len(gone), period)
            except Exception:  # noqa: BLE001 - a database hiccup: the next round retries
                log.exception("retention sweep failed")

    async def _beat(self) -> None:
        """Renew this replica's leases every third of the lease; note the jobs it lost; sweep now and then."""
        storage = self.state.storage
        last_sweep = time.monotonic()
        while True:
            await asyncio.sleep(storage.lease_s / 3)
            try:
                held = await anyio.to_thread.run_sync(storage.heartbeat)
                self._lost = {j for j in self._lost if j not in held}
                if self._current is not None and self._current not in held:
                    self._lost.add(self._current)
                if time.monotonic() - last_sweep > SWEEP_EVERY_S:
                    last_sweep = time.monotonic()
                    await anyio.to_thread.run_sync(storage.sweep, SWEEP_GRACE_S)
            except Exception:  # noqa: BLE001 - a database hiccup: the next beat retries (the lease outlives two)
                log.exception("lease renewal failed")

    async def _loop(self) -> None:
        st = self.state
        while not self._stopping:
            if not st.ready:
                await asyncio.sleep(0.1)
                continue
            try:
                job_id = await anyio.to_thread.run_sync(st.storage.claim_job)
                if job_id is not None:
                    self._current = job_id
                    try:
                        await self._run_job(job_id)
                    except Exception:  # noqa: BLE001 - the runner must survive a bad job
                        log.exception("job %s failed", job_id)
                        await anyio.to_thread.run_sync(self._fail_job, job_id, "internal error")
                    finally:
                        self._current = None
                        # stopping, or the worker closed: back to the queue (a no-op for a job finished or lost)
                        await anyio.to_thread.run_sync(st.storage.release_job, job_id)
                    continue
            except Exception:  # noqa: BLE001 - e.g. the database is unreachable: retry
                log.exception("job runner error")
                await asyncio.sleep(1.0)
                continue
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=POLL_S)
            except TimeoutError:
                pass

    def _keep_going(self, job_id: str) -> bool:
        storage = self.state.storage
        return not self._stopping and job_id not in self._lost and storage.job_status(job_id) == "running"

    async def _run_job(self, job_id: str) -> None:
        from .routes.generations import encode_png, resolve_params

        st, storage = self.state, self.state.storage
        job = await anyio.to_thread.run_sync(storage.get_job, job_id)
        req = JobRequest.model_validate(job["request"])
        try:
            params = resolve_params(req.settings, st.settings, st.engine)
        except ApiError as e:  # e.g. a job queued before a restart with lower limits: fail it, run the next one
            await anyio.to_thread.run_sync(self._fail_job, job_id, f"settings: {e.detail}")
            return
        for item in await anyio.to_thread.run_sync(storage.pending_items, job_id):
            if not await anyio.to_thread.run_sync(self._keep_going, job_id):
                return
            idx, ident = item["idx"], item["identity_id"]
            t0 = time.perf_counter()
            if not storage.identity_exists(ident):
                await anyio.to_thread.run_sync(storage.fail_item, job_id, idx, "identity not found", 0.0)
                continue
            await anyio.to_thread.run_sync(storage.touch_identity, ident)
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
            if not await anyio.to_thread.run_sync(storage.complete_item, job_id, idx, pngs, seeds, dt):
                return  # recorded (idempotently), but the job is no longer this replica's
        job = await anyio.to_thread.run_sync(storage.get_job, job_id)
        if job["done"] + job["failed"] < job["total"]:
            return  # canceled, lost or stopping
        if job["failed"]:
            status, err = "failed", f"{job['failed']} of {job['total']} items failed"
        else:
            status, err = "succeeded", None
        await anyio.to_thread.run_sync(storage.finish_job, job_id, status, err)

    def _fail_job(self, job_id: str, error: str) -> None:
        """Fail every pending item of a job that cannot run, then the job, with ``error``."""
        storage = self.state.storage
        for item in storage.pending_items(job_id):
            storage.fail_item(job_id, item["idx"], error, 0.0)
        storage.finish_job(job_id, "failed", error)
