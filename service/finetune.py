"""Fine-tune jobs: an identity whose adapter is trained on its photos with the dataset recipe (no hypernetwork needed).

A job lives in ``data_dir/finetunes/<job id>/`` (written atomically, independent of the database)::

    job.json           the request and the photos' report (name, steps, start, photo rows, consistency, ...)
    status.json        status, step / steps, loss, identity id, error (rewritten as the job moves)
    crop-<k>.png       the recipe's aligned training crops of the accepted photos (lossless)
    face-<k>.png, photo-<k>.jpg   the identity's face chips and re-encoded photos (moved into the identity)
    embeddings.npy     float32 (P, E) face embeddings of the accepted photos

One job runs at a time, on the model worker (``Engine.submit_call``: the UNet is wrapped for the training's
duration, then restored; generations wait meanwhile). The training is seeded, so a job interrupted by a restart
is run again from the start and gives the same adapter; a finished job's identity is stored exactly once (the job
is marked succeeded with its identity id after the identity is committed, and a re-run first looks for it).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import anyio
import numpy as np

from weights.atomic import atomic_write_bytes as atomic_write

from .state import ServiceState
from .storage import DEFAULT_TENANT, IdentityRecord, valid_id

log = logging.getLogger("difflora.finetune")

STATES = ("queued", "running", "succeeded", "failed", "canceled")
ACTIVE = ("queued", "running")


class Canceled(Exception):
    """Raised from the training's step callback when the job was canceled."""


@dataclass
class FinetuneStatus:
    id: str  # "ftj_<24 hex>"
    status: str  # queued | running | succeeded | failed | canceled
    created: float  # unix time
    steps: int  # optimisation steps asked for
    step: int = 0  # steps done
    loss: float | None = None  # last training loss
    started: float | None = None
    finished: float | None = None
    identity_id: str | None = None  # set when succeeded
    error: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # train / total


class FinetuneRunner:
    """Creates, runs (one at a time, oldest first), resumes and cancels fine-tune jobs (see the module docstring)."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state
        self.root = state.storage.root / "finetunes"
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._live: dict[str, FinetuneStatus] = {}  # every job's status (the files are the durable copy)
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task | None = None
        for d in sorted(self.root.iterdir()):
            st = self._read(d.name)
            if st is None:  # an interrupted create: no status file yet
                shutil.rmtree(d, ignore_errors=True)
                continue
            if st.status == "running":
                st.status, st.step, st.loss = "queued", 0, None  # re-run from the start (seeded: same adapter)
                self._write(st)
            self._live[st.id] = st

    # ---- files --------------------------------------------------------------------------------------------------
    def _dir(self, job_id: str) -> Path:
        if not valid_id(job_id, "ftj"):
            raise ValueError(f"invalid fine-tune id {job_id!r}")
        return self.root / job_id

    def _read(self, job_id: str) -> FinetuneStatus | None:
        try:
            return FinetuneStatus(**json.loads((self._dir(job_id) / "status.json").read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _write(self, st: FinetuneStatus) -> None:
        atomic_write(self._dir(st.id) / "status.json", json.dumps(asdict(st)).encode())

    # ---- API ----------------------------------------------------------------------------------------------------
    def active(self) -> int:
        return sum(st.status in ACTIVE for st in self._live.values())

    def get(self, job_id: str) -> FinetuneStatus | None:
        return self._live.get(job_id) if valid_id(job_id, "ftj") else None

    def create(
        self, job_id: str, request: dict, crops: list[np.ndarray], chips: dict, photos: dict, embeddings: np.ndarray
    ) -> FinetuneStatus:
        """Write a new job's files (status last: a crash before leaves a folder the next start removes)."""
        from PIL import Image

        d = self._dir(job_id)
        d.mkdir()
        atomic_write(d / "job.json", json.dumps(request).encode())
        for k, crop in enumerate(crops):
            atomic_write(d / f"crop-{k}.png", _png(Image.fromarray(crop)))
        for i, chip in chips.items():
            atomic_write(d / f"face-{i}.png", _png(Image.fromarray(chip)))
            atomic_write(d / f"photo-{i}.jpg", photos[i])
        buf = io.BytesIO()
        np.save(buf, np.asarray(embeddings, np.float32), allow_pickle=False)
        atomic_write(d / "embeddings.npy", buf.getvalue())
        st = FinetuneStatus(job_id, "queued", time.time(), int(request["steps"]))
        self._write(st)
        with self._lock:
            self._live[job_id] = st
        self._wake.set()
        return st

    def cancel(self, job_id: str) -> FinetuneStatus | None:
        """Cancel a queued or running job (a running one stops at its next step); finished jobs stay as they are."""
        st = self.get(job_id)
        if st is not None and st.status in ACTIVE:
            with self._lock:
                was, st.status, st.finished = st.status, "canceled", time.time()
                self._write(st)
            if was == "queued":
                self._drop_inputs(job_id)
        return st

    # ---- the loop -----------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="difflora-finetunes")

    async def stop(self) -> None:
        """Stop: a training in flight stops at its next step and is queued again for the next start."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=self.state.settings.drain_timeout_s + 5)

    async def _loop(self) -> None:
        while not self._stopping:
            todo = sorted((st for st in self._live.values() if st.status == "queued"), key=lambda st: st.created)
            if not self.state.ready or not todo:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=0.5)
                except TimeoutError:
                    pass
                continue
            try:
                await self._run(todo[0])
            except Exception as e:  # noqa: BLE001 - recorded on the job; the runner goes on
                log.exception("fine-tune %s failed", todo[0].id)
                self._finish(todo[0], "failed", f"{type(e).__name__}: {str(e)[:300]}")

    def _finish(self, st: FinetuneStatus, status: str, error: str | None = None) -> None:
        with self._lock:
            if st.status != "canceled":
                st.status, st.error, st.finished = status, error, time.time()
                self._write(st)
        self._drop_inputs(st.id)

    def _drop_inputs(self, job_id: str) -> None:
        """A finished job keeps its request and status only (the photos live on in the identity, if any)."""
        for p in self._dir(job_id).iterdir():
            if p.name not in ("job.json", "status.json"):
                p.unlink(missing_ok=True)

    async def _run(self, st: FinetuneStatus) -> None:
        from .engine import EngineClosedError

        state, d = self.state, self._dir(st.id)
        req = json.loads((d / "job.json").read_text())
        with self._lock:
            if st.status != "queued":
                return
            st.status, st.started, st.step, st.loss = "running", time.time(), 0, None
            self._write(st)
        t0 = time.perf_counter()
        crops = np.stack([_read_png(p) for p in sorted(d.glob("crop-*.png"), key=_index)])  # (N, H, W, 3)
        embs = np.load(d / "embeddings.npy", allow_pickle=False)
        init = None
        if req["start"] == "prediction":
            init = await asyncio.wrap_future(state.engine.submit_predict(embs))
        last_write = [0.0]

        def on_step(step: int, loss: float) -> None:  # worker thread
            if self._stopping or st.status == "canceled":
                raise Canceled
            st.step, st.loss = step + 1, round(loss, 6)
            if time.monotonic() - last_write[0] > 1.0 or step + 1 == st.steps:
                last_write[0] = time.monotonic()
                with self._lock:
                    if st.status == "running":
                        self._write(st)

        def train(pipe):
            from pipeline_data.adapter_train import train_identity

            cfg = _recipe(state, req["steps"])
            return train_identity(pipe, crops, cfg, base_model=state.recipe.base_model_id, init=init, on_step=on_step)

        try:
            res = await asyncio.wrap_future(state.engine.submit_call(train))
        except Canceled:
            if self._stopping and st.status != "canceled":  # server stopping: run again after the restart
                with self._lock:
                    st.status, st.step, st.loss = "queued", 0, None
                    self._write(st)
            return
        except EngineClosedError:
            with self._lock:
                st.status, st.step, st.loss = "queued", 0, None
                self._write(st)
            return
        t_train = time.perf_counter() - t0
        if st.status == "canceled":  # canceled while the last steps ran: nothing is stored
            return
        from .routes.identities import _store, identity_info

        identity_id = identity_of(st.id)
        if not state.storage.identity_exists(identity_id):  # a re-run after a crash between store and status
            chips = {i: _read_png(d / f"face-{i}.png") for i in req["inliers"]}
            photos = {i: (d / f"photo-{i}.jpg").read_bytes() for i in req["inliers"]}
            secs = {"faces": req["seconds_faces"], "train": round(t_train, 4)}
            info = identity_info(state, _Ident(req), req["rows"], res.adapter, "fine-tune", secs)
            info["finetune"] = {"job_id": st.id, "start": req["start"], **res.loss_summary()}
            owner = req.get("tenant", DEFAULT_TENANT)  # the tenant that asked for the fine-tune owns the identity
            rec = IdentityRecord(identity_id, time.time(), req["name"], info, embs.tobytes(), len(embs), tenant=owner)
            await anyio.to_thread.run_sync(_store, state, rec, res.adapter, chips, photos, t0)
            state.engine.cache_put(identity_id, res.adapter.to(state.engine.device))
        with self._lock:
            st.identity_id, st.seconds = identity_id, {"train": round(t_train, 3)}
        self._finish(st, "succeeded")


class _Ident:
    """What :func:`service.routes.identities.identity_info` reads of an identity, from the job's stored report."""

    def __init__(self, req: dict) -> None:
        self.consistency, self.consistent = req["consistency"], req["consistent"]
        self.warnings, self.backend = req["warnings"], req["face_backend"]


def identity_of(job_id: str) -> str:
    """The id of the identity a fine-tune job makes (fixed in advance, so a re-run never makes a second one)."""
    return "idt_" + job_id.partition("_")[2]


def _recipe(state: ServiceState, steps: int):
    from dataclasses import replace

    return replace(state.recipe, steps=int(steps), device=state.settings.device)


def crop_spec(pipe, recipe) -> tuple[int, float]:
    """(side, padding) of the training crops: the UNet's native image side and the recipe's crop padding."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor), float(recipe.crop_padding)


def _png(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _index(path: Path) -> int:
    return int(path.stem.rsplit("-", 1)[1])
