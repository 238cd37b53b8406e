"""What one running app holds, and the start-up sequence: load models → start the worker → warm up → ready."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .engine import Engine, GenParams
from .metrics import Metrics
from .settings import Settings
from .storage import Storage

log = logging.getLogger("difflora.service")


@dataclass
class ServiceState:
    settings: Settings
    storage: Storage
    metrics: Metrics
    engine: Engine | None = None  # set once the models are loaded
    encoder: Any = None  # FaceEncoder
    predictor_trained: bool = False
    predictor: str = "none"  # "trained" | "untrained" (dev: adapters are no-ops) | "none" (fine-tuning only)
    predictor_message: str = ""  # what the predictor status means for users (readyz, identity responses)
    recipe: Any = None  # pipeline_data.recipe.BuildConfig of the predictor's dataset (caption / trigger phrase)
    base_model: str = ""  # id of the loaded base model
    kohya_arch: str = "sd15"
    layers_per_block: int = 2
    ready: bool = False
    load_error: str | None = None
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    jobs: Any = None  # JobRunner
    finetunes: Any = None  # FinetuneRunner (service.finetune)
    uploads: int = 0  # identity uploads in progress or waiting for a face worker
    event_streams: int = 0  # open GET /v1/jobs/{id}/events streams (changed on the event loop only)
    face_limiter: Any = None  # anyio.CapacityLimiter(settings.face_workers), made on first use (needs a loop)
    on_load_failed: Any = None  # optional callback (difflora serve exits instead of serving a broken model)

    def forget_identity(self, identity_id: str) -> None:
        """Drop every in-memory copy of a deleted identity (the engine's adapter cache)."""
        if self.engine is not None:
            self.engine.forget(identity_id)

    def load(self) -> None:
        """Load everything and warm up (runs in a background thread; sets ``ready`` or ``load_error``)."""
        try:
            self._load()
            self.ready = True
            self.metrics.ready.set(1)
            log.info("ready (%s)", ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items()))
        except Exception as e:  # noqa: BLE001 - reported by /readyz
            if isinstance(e, (OSError, ValueError)):  # missing/mismatched models: a clear line, no traceback
                log.error("start-up failed: %s", e)
            else:
                log.exception("start-up failed")
            self.load_error = f"{type(e).__name__}: {e}"
            if self.on_load_failed is not None:
                self.on_load_failed(self.load_error)

    def _load(self) -> None:
        from pipeline_data.faces import get_encoder
        from pipeline_data.models import load_pipeline

        s = self.settings
        if s.threads:
            torch.set_num_threads(s.threads)
        t0 = time.perf_counter()
        dtype = None if s.dtype == "auto" else getattr(torch, s.dtype)
        pipe = load_pipeline(s.base_source, device=s.device, dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        self.base_model = s.preset if s.model_path is None else f"{s.preset}:{s.model_path}"
        pipe._difflora_base_id = s.preset
        cfg = pipe.unet.config
        self.kohya_arch = "sdxl" if getattr(cfg, "addition_embed_type", None) == "text_time" else "sd15"
        self.layers_per_block = int(cfg.layers_per_block if isinstance(cfg.layers_per_block, int) else 2)
        s.use_model_size(cfg.sample_size * pipe.vae_scale_factor)  # the model's own resolution, not the preset's
        self.timings["pipeline_load"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        kw = {"model_dir": s.face_model_dir} if s.face_backend == "insightface" and s.face_model_dir else {}
        self.encoder = get_encoder(s.face_backend, **kw)
        self.timings["faces_load"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        predictor = self._load_predictor(pipe)
        self.timings["predictor_load"] = time.perf_counter() - t0

        if predictor is not None and predictor.cond_dim != self.encoder.dim:
            raise ValueError(
                f"the hypernet expects {predictor.cond_dim}-d face embeddings but the {s.face_backend!r} backend "
                f"makes {self.encoder.dim}-d ones (use --face-backend {predictor.face_backend})"
            )

        from weights.formats.native import load_native

        self.engine = Engine(
            pipe,
            predictor,
            adapter_loader=lambda ident: load_native(self.storage.adapter_path(ident)),
            metrics=self.metrics,
            queue_size=s.queue_size,
            batch_wait_s=s.batch_wait_ms / 1000,
            max_batch_images=s.max_batch_images,
            cache_size=s.cache_size,
            predict_seed=s.predict_seed,
            threads=s.threads,
            mixed_batches=s.mixed_batches,
            per_sample_max_error=s.per_sample_max_error,
        )
        self.engine.start()
        if s.warmup:
            t0 = time.perf_counter()
            size = s.default_size
            fut = self.engine.submit_generate(None, GenParams(steps=2, width=size, height=size), ["warm-up"], [0])
            fut.result()
            if predictor is not None:
                emb = np.full((1, self.encoder.dim), self.encoder.dim**-0.5, np.float32)
                self.engine.submit_predict(emb).result()
            self.timings["warmup"] = time.perf_counter() - t0

    def export_info(self, title: str, num_images: int | None, made_by: str):
        """What this server's adapter downloads say about themselves (weights.formats.metadata.ExportInfo)."""
        from weights.formats.metadata import ExportInfo

        r = self.recipe
        return ExportInfo(
            title=title[:200], trigger=r.trigger, caption=r.caption, arch=self.kohya_arch,
            base_model=self.base_model[:200], resolution=self.settings.default_size, num_images=num_images,
            made_by=made_by,
        )  # fmt: skip

    def _load_predictor(self, pipe: Any) -> Any:
        from hypernet.predict import Predictor, load_recipe

        d = self.settings.hypernet_dir
        self.recipe = load_recipe(d, self.settings.preset)
        if d is not None and (d / "config.json").is_file():
            pred = Predictor.load(d, device=self.settings.device)
            self.predictor_trained, self.predictor = True, "trained"
            self.predictor_message = "identities are predicted from photos in about a second (POST /v1/identities)"
            return pred
        s = self.settings
        if s.hypernet_path and not s.untrained_hypernet and s.hypernet != "off":
            raise FileNotFoundError(f"no hypernetwork checkpoint at {s.hypernet_path}")
        self.predictor_trained = False
        if s.untrained_hypernet:
            self.predictor = "untrained"
            self.predictor_message = "the hypernetwork is untrained (development): predicted adapters do nothing"
            self.warnings.append(
                "no trained hypernetwork checkpoint found; using an untrained one (predicted adapters are no-ops)"
            )
            return Predictor.untrained(pipe, face_backend=s.face_backend, cond_dim=self.encoder.dim)
        why = "switched off (hypernet=off)" if s.hypernet == "off" else f"no trained hypernetwork for {s.preset!r}"
        self.predictor = "none"
        self.predictor_message = (
            f"{why}: identities are made by fine-tuning their adapter on the photos (POST /v1/finetunes, an "
            "asynchronous job with progress); POST /v1/identities is refused"
        )
        self.warnings.append(self.predictor_message)
        return None

    def start_loading(self) -> threading.Thread:
        t = threading.Thread(target=self.load, name="difflora-loader", daemon=True)
        t.start()
        return t
