"""The model worker: one thread per device owns the pipeline and the hypernet; everything else talks to it through a
bounded queue of tasks and gets a ``concurrent.futures.Future`` back (await it with ``asyncio.wrap_future``).

* Bounded: ``submit_*`` raises :class:`QueueFullError` (→ 429 + ``Retry-After``) when ``queue_size`` tasks wait.
* Batching: generation tasks with the same batch-shaping settings (:meth:`GenParams.batch_key`: size, steps,
  scheduler, guidance, negative prompt) are merged into one pipeline call (up to ``max_batch_images`` images),
  whatever their identities (``mixed_batches``; off: only tasks of one identity with equal settings, the old
  behaviour). Each image keeps its own CPU ``torch.Generator`` so a seed means the same noise alone or in a batch.
  Hypernet predictions queued together run as one batch too.
* How a batch gets its adapters (the rule, measured by ``bench/service.py``, see docs/service.md): one adapter
  (identity, scale) for every image → merged with ``weights.apply`` (merge from the cached originals, exact restore,
  no drift; it stays merged until another one is needed); several → one UNet batch with per-sample adapters
  (``weights.per_sample``, forward hooks, nothing merged). Non-LoRA adapters go per-sample through their LoRA
  export (``weights.convert.to_lora``; exact for LoRA) when its error is at most ``per_sample_max_error``,
  else they are run merged in their own call. Predicted adapters (and their LoRA forms) live in an LRU cache.
* Draining: :meth:`begin_drain` stops admitting (→ 503); :meth:`stop` lets queued work finish within a timeout.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from weights.adapter import Adapter
from weights.apply import applied, apply_adapter, restore
from weights.convert import to_lora
from weights.per_sample import batch_rows, per_sample_adapters, stack_adapters

from .metrics import Metrics
from .request_id import current_request_id

log = logging.getLogger("difflora.engine")

# allow-listed schedulers: name -> diffusers class name ("default" keeps the pipeline's own)
SCHEDULERS: dict[str, str | None] = {
    "default": None,
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
}


class QueueFullError(RuntimeError):
    """The model queue is full; retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the model queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class EngineClosedError(RuntimeError):
    """The engine is draining or stopped and admits no new work."""


@dataclass(frozen=True)
class GenParams:
    """Settings shared by all images of one model call (prompts and seeds are per image)."""

    negative_prompt: str = ""
    steps: int = 20
    guidance_scale: float = 5.0
    adapter_scale: float = 1.0
    width: int = 64
    height: int = 64
    scheduler: str = "default"

    def batch_key(self) -> tuple:
        """The settings that shape one pipeline call; tasks with equal keys can share a batch (the adapter scale is
        per image with per-sample adapters, so it is not part of it)."""
        return (self.negative_prompt, self.steps, self.guidance_scale, self.width, self.height, self.scheduler)


@dataclass
class _Task:
    kind: str  # "generate" | "predict" | "refine" | "call"
    future: cf.Future
    identity_id: str | None = None  # generate: None = base model
    params: GenParams | None = None
    prompts: list[str] = field(default_factory=list)  # one per image
    seeds: list[int] = field(default_factory=list)  # one per image
    embeddings: np.ndarray | None = None  # predict/refine: (P, E)
    crops: np.ndarray | None = None  # refine: (P, H, W, 3) aligned face crops at the pipeline's size
    refine_steps: int = 0  # refine: code optimisation steps
    fn: Callable[[Any], Any] | None = None  # call: fn(pipe), run alone with the base model's weights
    enqueued: float = field(default_factory=time.perf_counter)
    request_id: str | None = field(default_factory=current_request_id.get)  # X-Request-ID of the submitter

    @property
    def images(self) -> int:
        return len(self.seeds) if self.kind == "generate" else 1

    @property
    def adapter_key(self) -> tuple[str, float] | None:
        """(identity, scale) of the adapter this task's images need, None for the base model."""
        if self.identity_id is None or self.params is None or self.params.adapter_scale == 0:
            return None
        return (self.identity_id, float(self.params.adapter_scale))


@dataclass
class GenOutput:
    images: list  # PIL images, one per seed
    seeds: list[int]
    batch_images: int  # images in the model call this request was part of
    model_seconds: float  # pipeline time of that call
    queue_seconds: float  # time spent waiting in the queue
    batch_mode: str = "merged"  # how that call got its adapters: "merged" (or the base model) | "per_sample"
    batch_identities: int = 1  # distinct adapters (identity, scale; the base model counts) in that call


def _ids(tasks: list[_Task]) -> str:
    """The tasks' request ids for a log line (the worker thread has no request context of its own)."""
    return ", ".join(t.request_id or "-" for t in tasks)


class Engine:
    """One model worker thread (see the module docstring)."""

    def __init__(
        self,
        pipe: Any,
        predictor: Any,
        *,
        adapter_loader: Callable[[str], Adapter],
        metrics: Metrics | None = None,
        queue_size: int = 16,
        batch_wait_s: float = 0.005,
        max_batch_images: int = 8,
        cache_size: int = 32,
        predict_seed: int = 0,
        threads: int = 0,
        mixed_batches: bool = True,
        per_sample_max_error: float = 1e-3,
    ) -> None:
        self.pipe, self.predictor, self.adapter_loader = pipe, predictor, adapter_loader
        self.metrics = metrics or Metrics()
        self.queue_size, self.batch_wait_s, self.max_batch_images = queue_size, batch_wait_s, max_batch_images
        self.cache_size, self.predict_seed, self.threads = cache_size, predict_seed, threads
        self.mixed_batches, self.per_sample_max_error = mixed_batches, per_sample_max_error
        self.device = pipe.unet.device
        self._q: deque[_Task] = deque()
        self._cv = threading.Condition()
        self._busy = False
        self._draining = False
        self._stopping = False
        self._cache: OrderedDict[str, Adapter] = OrderedDict()
        self._lora: dict[str, Adapter | None] = {}  # identity -> its LoRA form for per-sample batches (None: merge)
        if applied(pipe.unet) is not None:  # a previous user of this pipeline left an adapter merged
            restore(pipe.unet)
        self._applied: tuple[str, float] | None = None  # (identity id, scale) merged into the UNet now
        self._schedulers: dict[str, Any] = {"default": pipe.scheduler}
        self._min_steps: dict[str, int] = {}
        self._avg_task_s = 1.0  # running mean of seconds per task, for Retry-After
        self._thread = threading.Thread(target=self._run, name="difflora-model-worker", daemon=True)

    # ---- lifecycle --------------------------------------------------------------------------------------------
    def start(self) -> None:
        # build every scheduler here, on the caller's thread: diffusers imports them lazily, and a lazy import in
        # the worker racing another thread's import has failed inside torch ("operator ... does not exist")
        for name in SCHEDULERS:
            self.min_steps(name)
        self._thread.start()

    def min_steps(self, scheduler: str) -> int:
        """Fewest denoising steps ``scheduler`` accepts with this model's config (PNDM's Runge-Kutta warm-up needs
        4 unless the config skips it), found once by trying ``set_timesteps`` on a copy."""
        n = self._min_steps.get(scheduler)
        if n is None:
            s = self._scheduler(scheduler)
            for n in range(1, 65):
                try:
                    type(s).from_config(s.config).set_timesteps(n)
                    break
                except (ValueError, IndexError, RuntimeError):
                    continue
            self._min_steps[scheduler] = n
        return n

    def begin_drain(self) -> None:
        """Stop admitting new work (new submits raise EngineClosedError); queued work still runs."""
        with self._cv:
            self._draining = True
            self._cv.notify_all()

    @property
    def draining(self) -> bool:
        return self._draining

    def stop(self, timeout: float = 30.0) -> None:
        """Drain: wait up to ``timeout`` s for queued and running work, then stop the worker; whatever is still
        queued fails with EngineClosedError."""
        self.begin_drain()
        deadline = time.monotonic() + timeout
        with self._cv:
            while (self._q or self._busy) and time.monotonic() < deadline:
                self._cv.wait(0.05)
            self._stopping = True
            left = list(self._q)
            self._q.clear()
            self._cv.notify_all()
        for t in left:
            t.future.set_exception(EngineClosedError("the server is shutting down"))
        if self._thread.is_alive():
            self._thread.join(timeout=max(0.0, deadline - time.monotonic()) + 5)

    # ---- admission --------------------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._q)

    def retry_after(self) -> int:
        """Seconds until the queue has room, roughly (at least 1)."""
        return max(1, math.ceil(self._avg_task_s * max(1, len(self._q)) / 2))

    def _submit(self, task: _Task) -> cf.Future:
        with self._cv:
            if self._draining or self._stopping:
                raise EngineClosedError("the server is shutting down")
            if len(self._q) >= self.queue_size:
                self.metrics.rejected.inc()
                raise QueueFullError(self.retry_after())
            self._q.append(task)
            self.metrics.queue_depth.set(len(self._q))
            self._cv.notify()
        return task.future

    def submit_generate(
        self, identity_id: str | None, params: GenParams, prompts: list[str], seeds: list[int]
    ) -> cf.Future:
        """Future of a :class:`GenOutput` with one image per (prompt, seed)."""
        if len(prompts) != len(seeds) or not seeds:
            raise ValueError("need one prompt per seed (at least one)")
        if params.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {params.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if params.steps < self.min_steps(params.scheduler):
            raise ValueError(f"scheduler {params.scheduler!r} needs at least {self.min_steps(params.scheduler)} steps")
        return self._submit(_Task("generate", cf.Future(), identity_id, params, list(prompts), list(seeds)))

    def submit_predict(self, embeddings: np.ndarray) -> cf.Future:
        """Future of the predicted :class:`Adapter` for one identity's (P, E) photo embeddings."""
        if self.predictor is None:
            raise RuntimeError("this server has no hypernetwork (predictor 'none'): adapters are made by fine-tuning")
        return self._submit(_Task("predict", cf.Future(), embeddings=np.asarray(embeddings, dtype=np.float32)))

    def submit_refine(self, embeddings: np.ndarray, crops: np.ndarray, steps: int) -> cf.Future:
        """Future of a ``hypernet.basis_predict.RefineResult``: the predicted code refined ``steps`` steps on the
        photos' aligned ``crops`` (basis predictors only; runs alone, on the base UNet)."""
        if not getattr(self.predictor, "supports_refine", False):
            raise ValueError("refine needs a hypernet over identity-basis codes; this server's predicts LoRA tokens")
        emb = np.asarray(embeddings, dtype=np.float32)
        return self._submit(_Task("refine", cf.Future(), embeddings=emb, crops=crops, refine_steps=int(steps)))

    def submit_call(self, fn: Callable[[Any], Any]) -> cf.Future:
        """Future of ``fn(pipe)`` run on the worker with the base model's weights (any merged adapter restored
        first), alone: e.g. fine-tuning an adapter, which wraps the UNet's layers for its duration."""
        return self._submit(_Task("call", cf.Future(), fn=fn))

    # ---- adapter cache ----------------------------------------------------------------------------------------
    def cache_put(self, identity_id: str, adapter: Adapter) -> None:
        with self._cv:
            self._cache[identity_id] = adapter
            self._cache.move_to_end(identity_id)
            self._lora.pop(identity_id, None)
            while len(self._cache) > self.cache_size:
                old, _ = self._cache.popitem(last=False)
                self._lora.pop(old, None)

    def forget(self, identity_id: str) -> None:
        """Drop an identity from the cache (after it was deleted)."""
        with self._cv:
            self._cache.pop(identity_id, None)
            self._lora.pop(identity_id, None)

    def cached(self) -> list[str]:
        return list(self._cache)

    def _adapter(self, identity_id: str) -> Adapter:
        with self._cv:
            a = self._cache.get(identity_id)
            if a is not None:
                self._cache.move_to_end(identity_id)
        if a is not None:
            self.metrics.cache.labels("hit").inc()
            return a
        self.metrics.cache.labels("miss").inc()
        a = self.adapter_loader(identity_id).to(self.device)
        self.cache_put(identity_id, a)
        return a

    def _lora_form(self, identity_id: str) -> Adapter | None:
        """The identity's adapter as a LoRA for per-sample batches (LoRA as is; other methods by their SVD export
        against the base weights when its relative error is at most ``per_sample_max_error``), else None: that
        identity is run merged. Call with the base weights in the UNet (nothing merged)."""
        adapter = self._adapter(identity_id)
        with self._cv:
            if identity_id in self._lora:
                return self._lora[identity_id]
        if adapter.spec.method == "lora":
            lora = adapter
        else:
            try:
                lora, report = to_lora(adapter, base=self.pipe.unet)
            except ValueError as e:  # no LoRA export for this adapter: merging still works
                log.info("identity %s: no LoRA export (%s); runs merged", identity_id, e)
                lora = None
            else:
                if report.max_error > self.per_sample_max_error or report.bias_dropped:
                    log.info("identity %s: %s; runs merged", identity_id, report.summary())
                    lora = None
                else:
                    lora = lora.to(self.device)
        with self._cv:
            if identity_id in self._cache:  # not evicted or deleted meanwhile
                self._lora[identity_id] = lora
        return lora

    # ---- worker -----------------------------------------------------------------------------------------------
    def _take(self) -> list[_Task] | None:
        """Block for the next task and gather the compatible tasks queued behind it, in queue order: predictions
        with predictions; generations with the same batch key (mixed batches) or the same identity and settings."""
        with self._cv:
            while not self._q and not self._stopping:
                self._cv.wait()
            if self._stopping:
                return None
            first = self._q.popleft()
            self._busy = True
        if self.batch_wait_s > 0 and first.kind == "generate" and first.images < self.max_batch_images:
            time.sleep(self.batch_wait_s)
        with self._cv:
            batch, n = [first], first.images
            for t in list(self._q):
                fits = (
                    t.kind == first.kind
                    and t.kind not in ("refine", "call")
                    and (t.kind == "predict" or self._fits(first, t, n))
                )
                if fits:
                    self._q.remove(t)
                    batch.append(t)
                    n += t.images
            self.metrics.queue_depth.set(len(self._q))
        return batch

    def _fits(self, first: _Task, t: _Task, n: int) -> bool:
        if n + t.images > self.max_batch_images:
            return False
        if self.mixed_batches:
            return t.params.batch_key() == first.params.batch_key()
        return t.identity_id == first.identity_id and t.params == first.params

    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)  # OpenMP thread counts are per calling thread: set it here
        while True:
            batch = self._take()
            if batch is None:
                return
            live = [t for t in batch if t.future.set_running_or_notify_cancel()]
            t0 = time.perf_counter()
            try:
                if live:
                    if live[0].kind == "predict":
                        self._run_predict(live)
                    elif live[0].kind == "refine":
                        self._run_refine(live)
                    elif live[0].kind == "call":
                        self._run_call(live[0])
                    else:
                        self._run_generate(live)
            except BaseException as e:  # noqa: BLE001 - every failure goes to the waiting requests
                log.exception("model call failed (requests %s)", _ids(live))
                for t in live:
                    if not t.future.done():
                        t.future.set_exception(e)
            finally:
                dt = (time.perf_counter() - t0) / max(1, len(batch))
                self._avg_task_s = 0.8 * self._avg_task_s + 0.2 * dt
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    @torch.inference_mode()
    def _run_predict(self, tasks: list[_Task]) -> None:
        t0 = time.perf_counter()
        adapters = self.predictor.predict_batch([t.embeddings for t in tasks], seed=self.predict_seed)
        self.metrics.predict_seconds.observe(time.perf_counter() - t0)
        for t, a in zip(tasks, adapters):
            t.future.set_result(a)

    def _run_refine(self, tasks: list[_Task]) -> None:
        self._set_adapter(None, 0.0)  # the code is fitted on the base UNet (per-sample hooks, nothing merged)
        for t in tasks:
            t0 = time.perf_counter()
            with torch.inference_mode():
                code = self.predictor.predict_codes([t.embeddings], seed=self.predict_seed)[0]
            t.future.set_result(self.predictor.refine(self.pipe, t.crops, code, t.refine_steps))
            self.metrics.predict_seconds.observe(time.perf_counter() - t0)

    def _run_call(self, task: _Task) -> None:
        self._set_adapter(None, 0.0)
        try:
            task.future.set_result(task.fn(self.pipe))
        finally:
            self._applied = None  # whatever fn did, the next request merges its adapter afresh

    def _set_adapter(self, identity_id: str | None, scale: float) -> None:
        want = None if identity_id is None or scale == 0 else (identity_id, float(scale))
        if want == self._applied:
            return
        t0 = time.perf_counter()
        if want is None:
            restore(self.pipe.unet)
        else:
            apply_adapter(self.pipe.unet, self._adapter(identity_id), scale)
        self._applied = want
        self.metrics.apply_seconds.observe(time.perf_counter() - t0)

    def _scheduler(self, name: str) -> Any:
        s = self._schedulers.get(name)
        if s is None:
            import diffusers

            s = getattr(diffusers, SCHEDULERS[name]).from_config(self._schedulers["default"].config)
            self._schedulers[name] = s
        return s

    def _cfg(self, p: GenParams) -> bool:
        """Whether the pipeline runs classifier-free guidance (2 UNet rows per image), as diffusers decides it."""
        return p.guidance_scale > 1 and getattr(self.pipe.unet.config, "time_cond_proj_dim", None) is None

    @torch.inference_mode()
    def _run_generate(self, tasks: list[_Task]) -> None:
        """One adapter for the whole batch: merged. Several: one per-sample call for every adapter that has a LoRA
        form, then one merged call per adapter that has none. A failure (a deleted identity's adapter file is gone)
        fails only the tasks of that adapter."""
        groups: dict[tuple[str, float] | None, list[_Task]] = {}
        for t in tasks:
            groups.setdefault(t.adapter_key, []).append(t)
        if len(groups) == 1:
            self._generate_merged(tasks)
            return
        self._set_adapter(None, 0.0)  # per-sample terms add to the base weights; LoRA exports need them too
        forms: dict[tuple[str, float] | None, Adapter | None] = {}
        alone: list[list[_Task]] = []
        for key, ts in groups.items():
            if key is None:
                forms[None] = None
                continue
            try:
                lora = self._lora_form(key[0])
            except Exception as e:  # noqa: BLE001 - goes to this adapter's requests only
                log.warning("identity %s: adapter unavailable (%s; requests %s)", key[0], type(e).__name__, _ids(ts))
                for t in ts:
                    t.future.set_exception(e)
                continue
            if lora is None:
                alone.append(ts)
            else:
                forms[key] = lora
        batch = [t for t in tasks if t.adapter_key in forms]
        if len(forms) > 1:
            self._guarded(batch, lambda: self._generate_per_sample(batch, forms))
        elif batch:
            alone.insert(0, batch)
        for ts in alone:
            self._guarded(ts, lambda ts=ts: self._generate_merged(ts))

    def _guarded(self, tasks: list[_Task], fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - every failure goes to the waiting requests
            log.exception("model call failed (requests %s)", _ids(tasks))
            for t in tasks:
                if not t.future.done():
                    t.future.set_exception(e)

    def _generate_merged(self, tasks: list[_Task]) -> None:
        p = tasks[0].params
        try:
            self._set_adapter(tasks[0].identity_id, p.adapter_scale)
        except Exception:
            self._applied = None  # apply restores the model on failure
            raise
        self._call(tasks, "merged", 1)

    def _generate_per_sample(self, tasks: list[_Task], forms: dict[tuple[str, float] | None, Adapter | None]) -> None:
        keys = [k for k in forms if k is not None]  # the stacked adapters, in first-seen order
        index = {k: i for i, k in enumerate(keys)}
        unet = self.pipe.unet
        ps = stack_adapters([forms[k] for k in keys], [k[1] for k in keys], dtype=unet.dtype)
        rows = batch_rows(
            [index.get(t.adapter_key, -1) for t in tasks for _ in t.seeds], cfg=self._cfg(tasks[0].params)
        )
        with per_sample_adapters(unet, ps, rows, freeze_base=False):
            self._call(tasks, "per_sample", len(forms))

    def _call(self, tasks: list[_Task], mode: str, identities: int) -> None:
        """One pipeline call for every image of ``tasks`` (adapters already in place); results to the futures."""
        p = tasks[0].params
        prompts = [s for t in tasks for s in t.prompts]
        seeds = [s for t in tasks for s in t.seeds]
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        self.pipe.scheduler = self._scheduler(p.scheduler)
        t0 = time.perf_counter()
        out = self.pipe(
            prompt=prompts,
            negative_prompt=[p.negative_prompt] * len(prompts) if p.negative_prompt else None,
            num_inference_steps=p.steps,
            guidance_scale=p.guidance_scale,
            width=p.width,
            height=p.height,
            generator=gens,
            output_type="pil",
        )
        dt = time.perf_counter() - t0
        self.metrics.generate_seconds.observe(dt)
        self.metrics.step_seconds.observe(dt / p.steps)
        self.metrics.batch_images.observe(len(seeds))
        self.metrics.batches.labels(mode).inc()
        self.metrics.batch_identities.observe(identities)
        now, i = time.perf_counter(), 0
        for t in tasks:
            n = len(t.seeds)
            t.future.set_result(
                GenOutput(out.images[i : i + n], t.seeds, len(seeds), dt, now - dt - t.enqueued, mode, identities)
            )
            i += n
