"""``create_app(settings)``: the FastAPI app, its lifespan (load, warm up, ready; drain on shutdown), middleware."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

import anyio
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from .errors import install_handlers
from .finetune import FinetuneRunner
from .jobs import JobRunner
from .metrics import Metrics
from .middleware import GuardMiddleware
from .routes import finetunes, generations, health, identities, jobs, web
from .settings import Settings
from .state import ServiceState
from .storage import Storage

log = logging.getLogger("difflora.service")

DESCRIPTION = """Zero-shot face personalization: upload photos of a person, a hypernetwork predicts a LoRA adapter,
generate images of that person from any prompt. Errors are always `{"error": {"code", "message", "request_id"}}`.
Every response carries an `X-Request-ID` (the request's own when it sends a valid one: 1-128 characters of
letters, digits and `. _ : -`; else 422).
With an API key configured, send it as `X-API-Key` (every endpoint but `/healthz`, `/readyz` and the web page)."""


def create_app(settings: Settings | None = None, *, load: bool = True) -> FastAPI:
    """The app for ``settings`` (default: from ``DIFFLORA_*``). ``load=False`` skips loading models (tests of
    the HTTP layer only); the server then stays not-ready."""
    settings = settings or Settings()
    storage = Storage(settings.data_dir, settings.database, lease_s=settings.job_lease_s, migrate=settings.migrate)
    # jobs another replica was running are left alone: the runner takes them over only once their lease expires
    swept = storage.sweep()
    if swept:
        log.info("start-up: removed %d leftover temp entries", swept)
    state = ServiceState(settings, storage, Metrics())
    state.finetunes = FinetuneRunner(state)  # resumes the fine-tunes an earlier run left queued or running

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if load:
            state.start_loading()
        state.jobs = JobRunner(state)
        state.jobs.start()
        state.finetunes.start()
        try:
            yield
        finally:
            if state.engine is not None:
                state.engine.begin_drain()
            await state.finetunes.stop()  # a training in flight stops at its next step and runs again next start
            await state.jobs.stop()
            if state.engine is not None:
                await anyio.to_thread.run_sync(state.engine.stop, settings.drain_timeout_s)
            storage.close()

    try:
        ver = version("difflora")
    except PackageNotFoundError:
        ver = "0"
    app = FastAPI(title="difflora", version=ver, description=DESCRIPTION, lifespan=lifespan)
    app.state.svc = state
    install_handlers(app)
    for r in (health.router, identities.router, finetunes.router, generations.router, jobs.router, web.router):
        app.include_router(r)
    app.mount("/static", StaticFiles(directory=web.STATIC_DIR), name="static")
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["X-API-Key", "Content-Type", "Idempotency-Key", "Accept", "X-Request-ID"],
            expose_headers=["X-Request-ID", "X-Seed", "X-Batch-Images"],
        )  # fmt: skip
    keys = settings.keyring()
    app.add_middleware(GuardMiddleware, max_body_bytes=settings.max_body_bytes, keys=keys, metrics=state.metrics)
    return app
