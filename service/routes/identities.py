"""``/v1/identities``: photos → face embeddings → predicted adapter (stored); list, read, delete, download the
adapter. Every identity belongs to the tenant that made it; another tenant's ids answer 404 like missing ones."""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import time
import zipfile
from collections.abc import Callable
from typing import Annotated

import anyio
import numpy as np
from fastapi import APIRouter, File, Form, Path, Query, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response

from pipeline_data.cliargs import MAX_REFINE_STEPS
from weights.atomic import atomic_write_bytes

from ..deps import (
    EngineDep,
    IdempotencyKey,
    PageCursor,
    PageLimit,
    StateDep,
    TenantDep,
    bad_cursor,
    idempotency_mismatch,
    submit,
    wait_for,
)
from ..errors import ApiError
from ..schemas import EXPORT_FORMATS, ErrorResponse, ExportFormat, IdentityList, IdentityPublic, PhotoPublic
from ..state import ServiceState
from ..storage import IdentityRecord, new_id

router = APIRouter(prefix="/v1/identities", tags=["identities"])

ERRORS = {
    400: {"model": ErrorResponse},  # a body that is not JSON / UTF-8, or a bad Content-Length (middleware)
    401: {"model": ErrorResponse},
    404: {"model": ErrorResponse},
    413: {"model": ErrorResponse},
    422: {"model": ErrorResponse},
    429: {"model": ErrorResponse},
    503: {"model": ErrorResponse},
}
FACE_SIZE = 128  # side of the stored aligned face crops
PHOTO_QUALITY = 95  # JPEG quality of the stored (re-encoded) photos


def _clean_name(name: str | None) -> str:
    """A client file name for display only: basename, printable, at most 80 characters."""
    base = re.split(r"[\\/]", name or "")[-1]
    return re.sub(r"[^\w .()+-]", "_", base)[:80]


def reencode_photo(rgb: np.ndarray) -> bytes:
    """A decoded photo ``(H, W, 3)`` (EXIF orientation already applied) as a fresh JPEG: no EXIF/GPS/XMP/ICC
    metadata, no comment, nothing appended after the image (what is stored is never the client's bytes)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=PHOTO_QUALITY)
    return buf.getvalue()


def _embed(state: ServiceState, datas: list[bytes], names: list[str], crop: tuple[int, float] | None = None):
    """Decode + embed every photo and build the identity (worker thread; the face models are CPU code).

    Returns ``(identity, aligned face chips, re-encoded photos, training crops)``, the last three keyed by inlier
    index; ``crop`` = (side, padding) also makes the dataset recipe's aligned training crops (else ``{}``)."""
    from pipeline_data.faces.identity import build_identity
    from pipeline_data.images import ImageDecodeError, decode_image

    s, enc = state.settings, state.encoder
    rgbs: list[np.ndarray | None] = []
    results: list = []
    for data in datas:
        try:
            limits = {"max_pixels": s.max_image_pixels, "max_bytes": s.max_body_bytes, "max_side": s.max_image_side}
            rgbs.append(decode_image(data, **limits))
            results.append(None)
        except ImageDecodeError as e:
            rgbs.append(None)
            results.append(e)
    ok = [i for i, r in enumerate(rgbs) if r is not None]
    for i, r in zip(ok, enc.embed_many([rgbs[i] for i in ok], errors="return")):
        results[i] = r
    ident = build_identity(enc, [b""] * len(datas), names=names, results=results)
    chips = {i: enc.align(rgbs[i], ident.photos[i].result.face, size=FACE_SIZE) for i in ident.inliers}
    clean = {i: reencode_photo(rgbs[i]) for i in ident.inliers}
    crops = {}
    if crop is not None:
        from pipeline_data.tiny.crops import aligned_crop

        crops = {i: aligned_crop(enc, rgbs[i], ident.photos[i].result.face, *crop) for i in ident.inliers}
    return ident, chips, clean, crops


def _photo_rows(ident, chips: dict, identity_id: str | None, filenames: list[str]) -> list[dict]:
    rows = []
    for i, p in enumerate(ident.photos):
        row = {"index": i, "filename": filenames[i], "accepted": p.ok and not p.outlier}
        if p.ok:
            row.update(
                num_faces=p.result.num_faces,
                face_box=[round(float(v), 1) for v in p.result.face.box],
                similarity=None if p.mean_similarity is None else round(p.mean_similarity, 4),
            )
        if not p.ok:
            row.update(code=p.error_code or "invalid_image", reason=p.error)
        elif p.outlier:
            row.update(code="outlier", reason=p.reason)
        elif p.result.warnings:
            row["reason"] = "; ".join(p.result.warnings)
        if identity_id and i in chips:
            row["face_url"] = f"/v1/identities/{identity_id}/faces/{i}.png"
        rows.append(row)
    return rows


def upload_hash(name: str, datas: list[bytes]) -> str:
    """SHA-256 of an upload (name and every photo's bytes, length-prefixed): what an Idempotency-Key replay must
    match."""
    h = hashlib.sha256(b"difflora-identity\0")
    for part in (name.encode(), *datas):
        h.update(len(part).to_bytes(8, "big") + part)
    return h.hexdigest()


def _store(
    state: ServiceState,
    rec: IdentityRecord,
    adapter,
    chips: dict,
    photos: dict[int, bytes],
    t0: float,
    key: str | None = None,
    digest: str | None = None,
) -> tuple[str, bool]:
    """Stage the identity's files, then add it (row + folder) in one step; ``t0``: when the request began. With an
    Idempotency-``key``: ``(id, created)`` as ``Storage.add_identity``."""
    from PIL import Image

    from weights.formats.native import save_native

    t_store = time.perf_counter()
    staged = state.storage.staging_dir()
    try:
        save_native(adapter, staged / "adapter.safetensors")
        for i, chip in chips.items():
            buf = io.BytesIO()
            Image.fromarray(chip).save(buf, format="PNG")
            atomic_write_bytes(staged / f"face-{i}.png", buf.getvalue())
            atomic_write_bytes(staged / f"photo-{i}.jpg", photos[i])
        now = time.perf_counter()  # timings go into the stored record, so GET returns them too
        rec.info["seconds"].update(store=round(now - t_store, 4), total=round(now - t0, 4))
        return state.storage.add_identity(rec, staged, key, digest)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


@router.get("", response_model=IdentityList, responses=ERRORS)
async def list_identities(
    state: StateDep, tenant: TenantDep, limit: PageLimit = 20, cursor: PageCursor = None
) -> IdentityList:
    """The caller's identities (an admin key: everyone's), oldest first, ``limit`` per page; follow
    ``next_cursor``."""
    try:
        page, nxt = await anyio.to_thread.run_sync(state.storage.list_identities, limit, cursor, tenant.scope)
    except ValueError:
        raise bad_cursor() from None
    return IdentityList(items=[_public(r) for r in page], next_cursor=nxt)


def _replay(state: ServiceState, identity_id: str) -> JSONResponse:
    """The identity an earlier request with the same Idempotency-Key made (200, not 201: nothing new)."""
    rec = state.storage.get_identity(identity_id)
    if rec is None:  # made, then deleted: the key is spent with it
        raise ApiError(404, "not_found", f"identity {identity_id!r} made with this Idempotency-Key was deleted")
    headers = {"Location": f"/v1/identities/{identity_id}"}
    return JSONResponse(_public(rec).model_dump(mode="json"), status_code=200, headers=headers)


class Replayed(Exception):
    """Raised by a ``read_photos`` ``before_embed`` hook to answer with ``response`` instead (an idempotent replay)."""

    def __init__(self, response: Response) -> None:
        super().__init__("replayed")
        self.response = response


async def read_photos(
    state: ServiceState,
    photos: list[UploadFile],
    crop: tuple[int, float] | None = None,
    before_embed: Callable[[list[bytes]], None] | None = None,
):
    """Read, bound and embed an upload's photos (see :func:`_embed`): ``(identity, chips, re-encoded photos,
    training crops, file names)``; 422 naming ``photos`` when there are too many or none has a usable face, 429 when
    too many uploads are in progress. ``before_embed(datas)`` sees the raw bytes before any face work (it may raise
    :class:`Replayed`)."""
    s = state.settings
    if len(photos) > s.max_photos:
        msg = f"at most {s.max_photos} photos per identity, got {len(photos)}"
        raise ApiError(422, "too_many_photos", msg, details=[{"field": "photos", "message": msg}])
    if state.uploads >= s.max_pending_uploads:  # decoded photos are large: bound the uploads held at once
        msg = f"{state.uploads} photo uploads are already being processed; retry shortly"
        raise ApiError(429, "queue_full", msg, headers={"Retry-After": "2"})
    if state.face_limiter is None:
        state.face_limiter = anyio.CapacityLimiter(s.face_workers)
    state.uploads += 1
    try:
        t0 = time.perf_counter()
        datas = [await f.read() for f in photos]
        filenames = [_clean_name(f.filename) for f in photos]
        if before_embed is not None:
            before_embed(datas)
        ident, chips, clean, crops = await anyio.to_thread.run_sync(
            _embed, state, datas, [f"photo[{i}]" for i in range(len(datas))], crop, limiter=state.face_limiter
        )
        del datas  # the client's bytes are never stored
    finally:
        state.uploads -= 1
    state.metrics.face_seconds.observe(time.perf_counter() - t0)
    if not ident.inliers:
        raise ApiError(
            422, "no_usable_face", "none of the photos gave a usable face",
            details=_photo_rows(ident, chips, None, filenames),
        )  # fmt: skip
    return ident, chips, clean, crops, filenames


def identity_info(state: ServiceState, ident, rows: list[dict], adapter, made_by: str, seconds: dict) -> dict:
    """The stored description of an identity (what GET returns)."""
    spec = adapter.spec
    return {
        "photos": rows,
        "consistency": round(float(ident.consistency), 4),
        "consistent": bool(ident.consistent),
        "warnings": list(ident.warnings),
        "face_backend": ident.backend,
        "adapter": {
            "method": spec.method, "rank": spec.rank, "layers": len(spec.layers), "parameters": adapter.num_params(),
            "base_model": spec.base_model, "spec_hash": spec.hash(),
        },
        "predictor_trained": state.predictor_trained,
        "predictor": state.predictor,
        "trigger": state.recipe.trigger, "prompt": state.recipe.caption, "made_by": made_by,
        "seconds": seconds,
    }  # fmt: skip


@router.post(
    "", status_code=201, response_model=IdentityPublic,
    responses={**ERRORS, 200: {"model": IdentityPublic, "description": "existing identity for this Idempotency-Key"},
               409: ERRORS[404]},
    summary="Create an identity from 1-10 face photos (multipart field `photos`)",
)  # fmt: skip
async def create_identity(
    state: StateDep,
    engine: EngineDep,
    tenant: TenantDep,
    photos: Annotated[list[UploadFile], File(description="1..max_photos face photos (JPEG/PNG/WebP)")],
    name: Annotated[str, Form(max_length=100, description="optional display name")] = "",
    idempotency_key: IdempotencyKey = None,
    refine_steps: Annotated[
        int, Form(ge=0, le=MAX_REFINE_STEPS, description="refine the predicted code on the photos (basis predictors)")
    ] = 0,
) -> IdentityPublic:
    """Embed the faces, drop photos with no face or of someone else, predict the adapter (optionally refined on the
    photos) and store it. A replay with the same ``Idempotency-Key`` and the same photos, name and refine steps
    returns the identity it made (200); with another request, 409."""
    if state.predictor == "none":
        raise ApiError(409, "no_predictor", state.predictor_message)
    if refine_steps and not getattr(engine.predictor, "supports_refine", False):
        msg = "refine needs a hypernet over identity-basis codes; this server's predicts LoRA tokens"
        raise ApiError(422, "refine_unsupported", msg, details=[{"field": "refine_steps", "message": msg}])
    digest: str | None = None

    def replay(datas: list[bytes]) -> None:
        nonlocal digest
        if idempotency_key is None:
            return
        tag = f"{name}\0refine_steps={refine_steps}" if refine_steps else name  # a refined upload is another request
        digest = upload_hash(tag, datas)
        try:
            found = state.storage.identity_for_key(tenant.name, idempotency_key, digest)
        except ValueError:
            raise idempotency_mismatch() from None
        if found is not None:
            raise Replayed(_replay(state, found))

    t0 = time.perf_counter()
    crop = (engine.pipe.unet.config.sample_size * engine.pipe.vae_scale_factor, _refine_padding(engine)) if (
        refine_steps
    ) else None  # fmt: skip
    try:
        ident, chips, clean, crops, filenames = await read_photos(state, photos, crop, before_embed=replay)
    except Replayed as r:
        return r.response
    t_faces = time.perf_counter() - t0
    embs = np.stack([ident.photos[i].result.embedding for i in ident.inliers]).astype(np.float32)  # (P, E)
    t1 = time.perf_counter()
    t_refine = None
    if refine_steps:
        stacked = np.stack([crops[i] for i in ident.inliers])  # (P, S, S, 3) in inlier order
        res = await wait_for(submit(engine.submit_refine, embs, stacked, refine_steps))
        adapter, t_refine = res.adapter, res.seconds
    else:
        adapter = await wait_for(submit(engine.submit_predict, embs))
    t_pred = time.perf_counter() - t1 - (t_refine or 0.0)
    identity_id = new_id("idt")
    rows = _photo_rows(ident, chips, identity_id, filenames)
    secs = {"faces": round(t_faces, 4), "predict": round(t_pred, 4)}
    info = identity_info(state, ident, rows, adapter, "prediction", secs)
    if t_refine is not None:
        info["seconds"]["refine"] = round(t_refine, 4)
        info["refine_steps"] = refine_steps
    rec = IdentityRecord(identity_id, time.time(), name, info, embs.tobytes(), len(embs), tenant=tenant.name)
    try:
        stored, created = await anyio.to_thread.run_sync(
            _store, state, rec, adapter, chips, clean, t0, idempotency_key, digest
        )
    except ValueError:  # the same key, another request, stored by a concurrent request meanwhile
        raise idempotency_mismatch() from None
    if not created:
        return _replay(state, stored)

    engine.cache_put(identity_id, adapter.to(engine.device))
    return _public(rec)


def _refine_padding(engine) -> float:
    """The crop padding of the photos the predictor's codes were fitted on (refine crops the same way)."""
    return float(getattr(engine.predictor, "recipe", {}).get("crop_padding", 0.3))


_MESSAGES = {"untrained": "predicted by an untrained hypernetwork (development): this adapter does nothing"}


def _public(rec: IdentityRecord) -> IdentityPublic:
    info = rec.info
    photos = [PhotoPublic(**p) for p in info["photos"]]
    used = sum(p.accepted for p in photos)
    return IdentityPublic(
        id=rec.id, name=rec.name, tenant=rec.tenant, created=rec.created, last_used=rec.last_used, photos=photos,
        photos_used=used,
        photos_rejected=len(photos) - used, consistency=info["consistency"], consistent=info["consistent"],
        warnings=info["warnings"], face_backend=info["face_backend"], adapter=info["adapter"],
        predictor_trained=info["predictor_trained"], seconds=info.get("seconds", {}),
        trigger=info.get("trigger", ""), prompt=info.get("prompt", ""), made_by=info.get("made_by", "prediction"),
        predictor=info.get("predictor", "trained" if info["predictor_trained"] else "untrained"),
        message=_MESSAGES.get(info.get("predictor", "")) if info.get("made_by") != "fine-tune" else None,
        downloads={f: f"/v1/identities/{rec.id}/adapter?format={f}" for f in EXPORT_FORMATS},
    )  # fmt: skip


def _get(state: ServiceState, identity_id: str, tenant) -> IdentityRecord:
    """The identity, if ``tenant`` may see it; else 404, the same as for an id that does not exist."""
    rec = state.storage.get_identity(identity_id, tenant.scope)
    if rec is None:
        raise ApiError(404, "not_found", f"identity {identity_id[:64]!r} not found")
    return rec


@router.get("/{identity_id}", response_model=IdentityPublic, responses=ERRORS)
async def get_identity(identity_id: str, state: StateDep, tenant: TenantDep) -> IdentityPublic:
    """An identity: its photos (used / rejected and why), consistency and adapter summary."""
    return _public(_get(state, identity_id, tenant))


@router.delete("/{identity_id}", status_code=204, responses=ERRORS)
async def delete_identity(identity_id: str, state: StateDep, tenant: TenantDep) -> Response:
    """Delete an identity and everything of it: its row (face embeddings), photos, face crops, adapter file, the
    in-memory adapter, and the images its batch-job items made."""
    if not await anyio.to_thread.run_sync(state.storage.delete_identity, identity_id, tenant.scope):
        raise ApiError(404, "not_found", f"identity {identity_id[:64]!r} not found")
    state.forget_identity(identity_id)
    return Response(status_code=204)


@router.get(
    "/{identity_id}/faces/{index}.png", responses={**ERRORS, 200: {"content": {"image/png": {}}}},
    response_class=FileResponse,
)  # fmt: skip
async def get_face(
    identity_id: str, index: Annotated[int, Path(ge=0, le=1000)], state: StateDep, tenant: TenantDep
) -> FileResponse:
    """The aligned face crop of an accepted photo."""
    _get(state, identity_id, tenant)
    path = state.storage.identity_dir(identity_id) / f"face-{index}.png"
    if index < 0 or not path.is_file():
        raise ApiError(404, "not_found", f"no face crop {index} for this identity")
    return FileResponse(path, media_type="image/png")


def _export(state: ServiceState, rec: IdentityRecord, fmt: str) -> tuple[bytes, str, str]:
    """The identity's adapter as ``fmt`` with its title, trigger phrase and training metadata (docs/exports.md)."""
    from weights.formats.native import load_native
    from weights.io import save_adapter

    adapter = load_native(state.storage.adapter_path(rec.id))
    how = f"difflora {rec.info.get('made_by', 'prediction')} ({state.base_model})"
    info = state.export_info(rec.name or rec.id, rec.num_embeddings or None, how)
    staged = state.storage.staging_dir()
    try:
        if fmt in ("native", "diffusers", "kohya"):
            kw = {"arch": state.kohya_arch, "layers_per_block": state.layers_per_block} if fmt == "kohya" else {}
            save_adapter(adapter, staged / "a.safetensors", fmt, info=info, **kw)
            return (staged / "a.safetensors").read_bytes(), "application/octet-stream", "safetensors"
        save_adapter(adapter, staged / "peft", "peft", info=info)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
            for f in sorted((staged / "peft").iterdir()):
                z.write(f, f.name)
        return buf.getvalue(), "application/zip", "zip"
    finally:
        shutil.rmtree(staged, ignore_errors=True)


@router.get(
    "/{identity_id}/adapter",
    responses={**ERRORS, 200: {"content": {"application/octet-stream": {}, "application/zip": {}}}},
    response_class=Response,
)  # fmt: skip
async def download_adapter(
    identity_id: str,
    state: StateDep,
    tenant: TenantDep,
    format: Annotated[ExportFormat, Query(description="file format (docs/exports.md says which tool wants which)")] = (
        "diffusers"
    ),
) -> Response:
    """The adapter as a file: diffusers (``pipe.load_lora_weights``), kohya (ComfyUI, AUTOMATIC1111/Forge), peft (a
    zip with ``adapter_config.json`` + ``adapter_model.safetensors``) or native (lossless, any method). Every file
    carries the trigger phrase and the kohya ``ss_*`` / SAI ``modelspec.*`` metadata (docs/exports.md)."""
    rec = _get(state, identity_id, tenant)
    data, media, ext = await anyio.to_thread.run_sync(_export, state, rec, format)
    fname = f"{identity_id}-{format}.{ext}"
    return Response(data, media_type=media, headers={"Content-Disposition": f'attachment; filename="{fname}"'})
