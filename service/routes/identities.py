"""``/v1/identities``: photos → face embeddings → predicted adapter (stored); read, delete, download the adapter."""

from __future__ import annotations

import io
import re
import shutil
import time
import zipfile
from typing import Annotated

import anyio
import numpy as np
from fastapi import APIRouter, File, Form, Path, Query, UploadFile
from fastapi.responses import FileResponse, Response

from ..deps import EngineDep, StateDep, submit, wait_for
from ..errors import ApiError
from ..schemas import EXPORT_FORMATS, ErrorResponse, ExportFormat, IdentityPublic, PhotoPublic
from ..state import ServiceState
from ..storage import IdentityRecord, atomic_write, new_id

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


def _store(
    state: ServiceState, rec: IdentityRecord, adapter, chips: dict, photos: dict[int, bytes], t0: float
) -> None:
    """Stage the identity's files, then add it (row + folder) in one step; ``t0``: when the request began."""
    from PIL import Image

    from weights.formats.native import save_native

    t_store = time.perf_counter()
    staged = state.storage.staging_dir()
    try:
        save_native(adapter, staged / "adapter.safetensors")
        for i, chip in chips.items():
            buf = io.BytesIO()
            Image.fromarray(chip).save(buf, format="PNG")
            atomic_write(staged / f"face-{i}.png", buf.getvalue())
            atomic_write(staged / f"photo-{i}.jpg", photos[i])
        now = time.perf_counter()  # timings go into the stored record, so GET returns them too
        rec.info["seconds"].update(store=round(now - t_store, 4), total=round(now - t0, 4))
        state.storage.add_identity(rec, staged)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


async def read_photos(state: ServiceState, photos: list[UploadFile], crop: tuple[int, float] | None = None):
    """Read, bound and embed an upload's photos (see :func:`_embed`): ``(identity, chips, re-encoded photos,
    training crops, file names)``; 422 naming ``photos`` when there are too many or none has a usable face, 429 when
    too many uploads are in progress."""
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
    "", status_code=201, response_model=IdentityPublic, responses=ERRORS,
    summary="Create an identity from 1-10 face photos (multipart field `photos`)",
)  # fmt: skip
async def create_identity(
    state: StateDep,
    engine: EngineDep,
    photos: Annotated[list[UploadFile], File(description="1..max_photos face photos (JPEG/PNG/WebP)")],
    name: Annotated[str, Form(max_length=100, description="optional display name")] = "",
) -> IdentityPublic:
    """Embed the faces, drop photos with no face or of someone else, predict the adapter and store it."""
    if state.predictor == "none":
        raise ApiError(409, "no_predictor", state.predictor_message)
    t0 = time.perf_counter()
    ident, chips, clean, _, filenames = await read_photos(state, photos)
    t_faces = time.perf_counter() - t0
    embs = np.stack([ident.photos[i].result.embedding for i in ident.inliers]).astype(np.float32)  # (P, E)
    t1 = time.perf_counter()
    adapter = await wait_for(submit(engine.submit_predict, embs))
    t_pred = time.perf_counter() - t1
    identity_id = new_id("idt")
    rows = _photo_rows(ident, chips, identity_id, filenames)
    secs = {"faces": round(t_faces, 4), "predict": round(t_pred, 4)}
    info = identity_info(state, ident, rows, adapter, "prediction", secs)
    rec = IdentityRecord(identity_id, time.time(), name, info, embs.tobytes(), len(embs))
    await anyio.to_thread.run_sync(_store, state, rec, adapter, chips, clean, t0)
    engine.cache_put(identity_id, adapter.to(engine.device))
    return _public(rec)


_MESSAGES = {"untrained": "predicted by an untrained hypernetwork (development): this adapter does nothing"}


def _public(rec: IdentityRecord) -> IdentityPublic:
    info = rec.info
    photos = [PhotoPublic(**p) for p in info["photos"]]
    used = sum(p.accepted for p in photos)
    return IdentityPublic(
        id=rec.id, name=rec.name, created=rec.created, photos=photos, photos_used=used,
        photos_rejected=len(photos) - used, consistency=info["consistency"], consistent=info["consistent"],
        warnings=info["warnings"], face_backend=info["face_backend"], adapter=info["adapter"],
        predictor_trained=info["predictor_trained"], seconds=info.get("seconds", {}),
        trigger=info.get("trigger", ""), prompt=info.get("prompt", ""), made_by=info.get("made_by", "prediction"),
        predictor=info.get("predictor", "trained" if info["predictor_trained"] else "untrained"),
        message=_MESSAGES.get(info.get("predictor", "")) if info.get("made_by") != "fine-tune" else None,
        downloads={f: f"/v1/identities/{rec.id}/adapter?format={f}" for f in EXPORT_FORMATS},
    )  # fmt: skip


def _get(state: ServiceState, identity_id: str) -> IdentityRecord:
    rec = state.storage.get_identity(identity_id)
    if rec is None:
        raise ApiError(404, "not_found", f"identity {identity_id[:64]!r} not found")
    return rec


@router.get("/{identity_id}", response_model=IdentityPublic, responses=ERRORS)
async def get_identity(identity_id: str, state: StateDep) -> IdentityPublic:
    """An identity: its photos (used / rejected and why), consistency and adapter summary."""
    return _public(_get(state, identity_id))


@router.delete("/{identity_id}", status_code=204, responses=ERRORS)
async def delete_identity(identity_id: str, state: StateDep) -> Response:
    """Delete an identity, its photos and its adapter."""
    if not await anyio.to_thread.run_sync(state.storage.delete_identity, identity_id):
        raise ApiError(404, "not_found", f"identity {identity_id[:64]!r} not found")
    if state.engine is not None:
        state.engine.forget(identity_id)
    return Response(status_code=204)


@router.get(
    "/{identity_id}/faces/{index}.png", responses={**ERRORS, 200: {"content": {"image/png": {}}}},
    response_class=FileResponse,
)  # fmt: skip
async def get_face(identity_id: str, index: Annotated[int, Path(ge=0, le=1000)], state: StateDep) -> FileResponse:
    """The aligned face crop of an accepted photo."""
    _get(state, identity_id)
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
    format: Annotated[ExportFormat, Query(description="file format (docs/exports.md says which tool wants which)")] = (
        "diffusers"
    ),
) -> Response:
    """The adapter as a file: diffusers (``pipe.load_lora_weights``), kohya (ComfyUI, AUTOMATIC1111/Forge), peft (a
    zip with ``adapter_config.json`` + ``adapter_model.safetensors``) or native (lossless, any method). Every file
    carries the trigger phrase and the kohya ``ss_*`` / SAI ``modelspec.*`` metadata (docs/exports.md)."""
    rec = _get(state, identity_id)
    data, media, ext = await anyio.to_thread.run_sync(_export, state, rec, format)
    fname = f"{identity_id}-{format}.{ext}"
    return Response(data, media_type=media, headers={"Content-Disposition": f'attachment; filename="{fname}"'})
