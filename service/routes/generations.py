"""``POST /v1/generations``: prompt (+ identity) → PNG (``Accept: image/png``) or JSON with base64 PNGs."""

from __future__ import annotations

import base64
import io
import secrets
import time

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..deps import EngineDep, StateDep, TenantDep, submit, wait_for
from ..engine import Engine, GenParams
from ..errors import ApiError
from ..schemas import MAX_SEED, ErrorResponse, GenerateRequest, GenerateResponse, GenerationSettings
from ..settings import Settings
from .identities import ERRORS

router = APIRouter(tags=["generations"])


def resolve_params(g: GenerationSettings, s: Settings, engine: Engine | None = None) -> GenParams:
    """Fill server defaults and enforce the configured limits (422 ``limit_exceeded``) and, given the engine, the
    scheduler's fewest steps (422 ``invalid_request``)."""
    steps = g.steps if g.steps is not None else s.default_steps
    width = g.width if g.width is not None else s.default_size
    height = g.height if g.height is not None else s.default_size
    least = engine.min_steps(g.scheduler) if engine is not None else 1
    if steps < least:
        msg = f"scheduler {g.scheduler!r} needs at least {least} steps"
        raise ApiError(422, "invalid_request", f"steps: {msg}", details=[{"field": "steps", "message": msg}])
    bad = []
    if steps > s.max_steps:
        bad.append({"field": "steps", "message": f"at most {s.max_steps} on this server"})
    for name, v in (("width", width), ("height", height)):
        if v > s.max_size:
            bad.append({"field": name, "message": f"at most {s.max_size} on this server"})
    if bad:
        msg = "; ".join(f"{b['field']}: {b['message']}" for b in bad)
        raise ApiError(422, "limit_exceeded", msg, details=bad)
    return GenParams(
        negative_prompt=g.negative_prompt, steps=steps, guidance_scale=g.guidance_scale,
        adapter_scale=g.adapter_scale, width=width, height=height, scheduler=g.scheduler,
    )  # fmt: skip


def encode_png(images: list) -> list[bytes]:
    """PIL images → PNG bytes (no metadata, deterministic)."""
    out = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _wants_png(request: Request) -> bool:
    """Content negotiation: PNG when ``Accept`` prefers image/png to JSON (q-values; on a tie, the first listed)."""
    q: dict[str, tuple[float, int]] = {}  # media range -> (quality, position)
    for pos, part in enumerate(request.headers.get("accept", "").split(",")):
        media, *params = (x.strip() for x in part.split(";"))
        quality = 1.0
        for p in params:
            if p.lower().startswith("q="):
                try:
                    quality = float(p[2:])
                except ValueError:
                    quality = 0.0
        q.setdefault(media.lower(), (quality, pos))
    png = q.get("image/png", (0.0, 0))
    if png[0] <= 0:
        return False
    js = q.get("application/json") or q.get("application/*") or q.get("*/*") or (0.0, 0)
    return png[0] > js[0] or (png[0] == js[0] and png[1] < js[1])


@router.post(
    "/v1/generations",
    response_model=GenerateResponse,
    responses={
        **ERRORS,
        406: {"model": ErrorResponse, "description": "Accept: image/png with num_images > 1"},
        200: {"content": {"image/png": {}}, "description": "JSON, or one PNG with Accept: image/png"},
    },
)
async def generate(
    req: GenerateRequest, request: Request, state: StateDep, engine: EngineDep, tenant: TenantDep
) -> GenerateResponse:
    """Generate images of an identity (or of the base model without ``identity_id``). The seed is returned."""
    s = state.settings
    params = resolve_params(req, s, engine)
    if req.num_images > s.max_num_images:
        msg = f"at most {s.max_num_images} on this server"
        raise ApiError(422, "limit_exceeded", f"num_images: {msg}", details=[{"field": "num_images", "message": msg}])
    png = _wants_png(request)
    if png and req.num_images != 1:
        raise ApiError(406, "not_acceptable", "Accept: image/png returns one image; ask for JSON for num_images > 1")
    if req.identity_id is not None:
        if not state.storage.identity_exists(req.identity_id, tenant.scope):  # another tenant's: not found either
            raise ApiError(404, "not_found", f"identity {req.identity_id[:64]!r} not found")
        await anyio.to_thread.run_sync(state.storage.touch_identity, req.identity_id)
    seed = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED + 1)
    seeds = [(seed + i) % (MAX_SEED + 1) for i in range(req.num_images)]
    t0 = time.perf_counter()
    fut = submit(engine.submit_generate, req.identity_id, params, [req.prompt] * len(seeds), seeds)
    try:
        out = await wait_for(fut)
    except ApiError:
        raise
    except Exception:
        # the identity was deleted while this request waited in the queue (its adapter file is gone)
        if req.identity_id is not None and not state.storage.identity_exists(req.identity_id):
            raise ApiError(404, "not_found", f"identity {req.identity_id[:64]!r} was deleted") from None
        raise
    pngs = await anyio.to_thread.run_sync(encode_png, out.images)
    seconds = {
        "queue": round(out.queue_seconds, 4), "model": round(out.model_seconds, 4),
        "total": round(time.perf_counter() - t0, 4),
    }  # fmt: skip
    if png:
        headers = {"X-Seed": str(seed), "X-Batch-Images": str(out.batch_images)}
        return Response(pngs[0], media_type="image/png", headers=headers)
    info = {
        "identity_id": req.identity_id, "prompt": req.prompt, "negative_prompt": params.negative_prompt,
        "steps": params.steps, "guidance_scale": params.guidance_scale, "adapter_scale": params.adapter_scale,
        "width": params.width, "height": params.height, "scheduler": params.scheduler, "seeds": seeds,
        "batch_images": out.batch_images, "base_model": state.base_model,
    }  # fmt: skip
    images = [{"seed": sd, "png_base64": base64.b64encode(b).decode()} for sd, b in zip(seeds, pngs)]
    return GenerateResponse(images=images, seed=seed, info=info, seconds=seconds)
