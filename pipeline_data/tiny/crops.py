"""Aligned 64x64 face crops for the tiny base model, cached as one uint8 array.

Crops follow one convention (``CROP_SIZE``, ``CROP_PADDING``) that every part of the tiny world shares: the
base model is trained on it and the adapter dataset must crop its photos the same way.

Training crops: dlib HOG detector + 5-point landmarks + ``dlib.get_face_chip``, called directly (this module was
written before ``pipeline_data.faces`` existed and does not need its descriptor model). The landmark model is
located via ``importlib.util.find_spec`` without importing ``face_recognition_models`` (its import needs
``pkg_resources``). Identities in the reserved ``eval`` split are excluded. Other code should crop through the
faces API with ``tiny_crop(rgb)``: with the dlib backend it gives the identical crop (tested on LFW; ORL's tiny
photos may differ by a few grey levels because the detector upsamples them differently).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from pipeline_data.splits import split_of

CROP_SIZE = 64  # side of the training crops in pixels
CROP_PADDING = 0.3  # dlib get_face_chip padding: 0.3 keeps hair and the face outline
CHIP_OVERSAMPLE = 2  # align at 2x then box-downsample: less aliasing than aligning at 64 directly
DATASETS = ("lfw", "celeba", "orl")  # identity-folder datasets under the faces root used for the v1 base model
ALL_DATASETS = (*DATASETS, "lfw_few")  # v2 also trains on the 1-3-photo people of lfw_few/
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".pgm", ".bmp", ".webp")
DETECT_MAX_SIDE = 800  # photos are downscaled to this before detection (retry at full size if no face)


@dataclass(frozen=True)
class CropRecord:
    """Where one crop came from."""

    dataset: str  # dataset folder name (lfw, celeba, orl)
    identity: str  # identity folder name
    file: str  # file name inside the identity folder
    split: str  # split_of(dataset, identity): "train" or "val" (eval identities are never cropped here)
    grey: bool  # the source photo is greyscale (captioned as a black and white photo)


def landmark_model_path(name: str = "shape_predictor_5_face_landmarks.dat") -> Path:
    """Path of a model file shipped by face-recognition-models, found without importing the package."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("face-recognition-models is not installed (pip install face-recognition-models)")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / name
    if not path.is_file():
        raise FileNotFoundError(f"dlib model file missing: {path}")
    return path


def list_photos(faces_root: str | Path, datasets: tuple[str, ...] = DATASETS) -> list[tuple[str, str, Path]]:
    """(dataset, identity, path) for every photo of every non-eval identity, sorted."""
    root = Path(faces_root)
    if not root.is_dir():
        raise FileNotFoundError(f"faces directory not found: {root}")
    out: list[tuple[str, str, Path]] = []
    for ds in datasets:
        ds_dir = root / ds
        if not ds_dir.is_dir():
            continue
        for ident in sorted(p.name for p in ds_dir.iterdir() if p.is_dir()):
            if split_of(ds, ident) == "eval":
                continue
            for f in sorted((ds_dir / ident).iterdir()):
                if f.suffix.lower() in IMAGE_EXTS and f.is_file():
                    out.append((ds, ident, f))
    return out


_DET = None
_SP = None


def _models():
    global _DET, _SP
    if _DET is None:
        import dlib

        _DET = dlib.get_frontal_face_detector()
        _SP = dlib.shape_predictor(str(landmark_model_path()))
    return _DET, _SP


def _load_rgb(path: Path) -> tuple[np.ndarray, bool]:
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        grey = im.mode in ("L", "I", "I;16", "1", "LA")
        rgb = np.asarray(im.convert("RGB"))
    if not grey:  # colour files that are really greyscale (some LFW news photos)
        r, g, b = (rgb[..., i].astype(np.int16) for i in range(3))
        grey = bool(np.abs(r - g).mean() < 2 and np.abs(g - b).mean() < 2)
    return np.ascontiguousarray(rgb), grey


def _detect(rgb: np.ndarray):
    """Largest face as a dlib full_object_detection in full-image coordinates, or None."""
    import dlib

    det, sp = _models()
    h, w = rgb.shape[:2]
    scale = min(1.0, DETECT_MAX_SIDE / max(h, w))
    tries = [(scale, 0 if max(h, w) * scale >= 300 else 1)]
    if scale < 1.0:
        tries.append((1.0, 0))
    for s, upsample in tries:
        img = (
            rgb if s == 1.0 else np.asarray(Image.fromarray(rgb).resize((round(w * s), round(h * s)), Image.BILINEAR))
        )
        rects = det(img, upsample)
        if len(rects):
            r = max(rects, key=lambda r: r.area())
            full = dlib.rectangle(int(r.left() / s), int(r.top() / s), int(r.right() / s), int(r.bottom() / s))
            return sp(rgb, full)
    return None


def align_crop(rgb: np.ndarray, shape, size: int = CROP_SIZE, padding: float = CROP_PADDING) -> np.ndarray:
    """Aligned (size, size, 3) uint8 crop from a dlib landmark shape, box-filtered from 2x."""
    import dlib

    chip = dlib.get_face_chip(rgb, shape, size=size * CHIP_OVERSAMPLE, padding=padding)
    return np.asarray(Image.fromarray(chip).resize((size, size), Image.BOX))


def tiny_crop(rgb: np.ndarray, face=None, encoder=None) -> np.ndarray:
    """The tiny model's crop of one face through the faces API (``pipeline_data.faces``).

    ``face`` defaults to the largest detected face (NoFaceError when there is none); ``encoder`` to the dlib
    backend. With the dlib backend this equals ``crop_photo``'s crop of the same photo.
    """
    from pipeline_data.faces import NoFaceError, get_encoder

    enc = encoder or get_encoder("dlib")
    if face is None:
        faces = enc.detect(rgb)
        if not faces:
            raise NoFaceError("no face found in the image")
        face = faces[0]
    return aligned_crop(enc, rgb, face)


def aligned_crop(encoder, rgb: np.ndarray, face, size: int = CROP_SIZE, padding: float = CROP_PADDING) -> np.ndarray:
    """(size, size, 3) uint8: the encoder's aligned chip at ``CHIP_OVERSAMPLE`` x size, box-filtered down (the way
    the tiny base's training crops were made)."""
    chip = encoder.align(rgb, face, size=size * CHIP_OVERSAMPLE, padding=padding)
    return np.asarray(Image.fromarray(chip).resize((size, size), Image.BOX))


def crop_photo(
    path: str | Path, size: int = CROP_SIZE, padding: float = CROP_PADDING
) -> tuple[np.ndarray, bool] | None:
    """(crop, grey) for the largest face of one photo, or None when no face is found."""
    rgb, grey = _load_rgb(Path(path))
    shape = _detect(rgb)
    if shape is None:
        return None
    return align_crop(rgb, shape, size, padding), grey


def _work(item: tuple[str, str, str, int]):
    ds, ident, path, size = item
    try:
        res = crop_photo(path, size)
    except (OSError, ValueError):
        return item, None
    return item, res


def _cache_key(photos: list[tuple[str, str, Path]], size: int) -> str:
    h = hashlib.sha256(f"{size}/{CROP_PADDING}/{CHIP_OVERSAMPLE}/v1".encode())
    for ds, ident, p in photos:
        h.update(f"{ds}/{ident}/{p.name}\n".encode())
    return h.hexdigest()[:16]


def build_crops(
    faces_root: str | Path,
    cache_dir: str | Path,
    max_photos: int | None = None,
    workers: int = 2,
    progress: bool = True,
    size: int = CROP_SIZE,
    datasets: tuple[str, ...] = DATASETS,
) -> tuple[np.ndarray, list[CropRecord]]:
    """Crop every non-eval photo of ``datasets`` under ``faces_root`` (cached under ``cache_dir``).

    Returns ``(crops, records)``: crops is (N, size, size, 3) uint8, records[i] describes crops[i].
    ``max_photos`` keeps an evenly spaced subset (for tests).
    """
    photos = list_photos(faces_root, datasets)
    if not photos:
        raise ValueError(f"no photos of non-eval identities under {faces_root} (expected {'/'.join(datasets)}/<id>/)")
    if max_photos is not None and len(photos) > max_photos:
        idx = np.linspace(0, len(photos) - 1, max_photos).round().astype(int)
        photos = [photos[i] for i in sorted(set(idx.tolist()))]
    cache = Path(cache_dir) / f"crops-{_cache_key(photos, size)}"
    arr_path, meta_path = cache / "crops.npy", cache / "crops.json"
    if arr_path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        return np.load(arr_path, allow_pickle=False), [CropRecord(**m) for m in meta["records"]]

    items = [(ds, ident, str(p), size) for ds, ident, p in photos]
    crops: list[np.ndarray] = []
    records: list[CropRecord] = []
    missed = 0
    from tqdm import tqdm

    bar = tqdm(total=len(items), desc="crops", disable=not progress, mininterval=5)
    if workers > 1:
        pool = get_context("fork").Pool(workers)
        results = pool.imap(_work, items, chunksize=16)
    else:
        pool, results = None, map(_work, items)
    try:
        for (ds, ident, path, _), res in results:
            bar.update(1)
            if res is None:
                missed += 1
                continue
            crop, grey = res
            crops.append(crop)
            records.append(CropRecord(ds, ident, Path(path).name, split_of(ds, ident), grey))
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        bar.close()
    if not crops:
        raise ValueError(f"no faces found in {len(items)} photos under {faces_root}")
    arr = np.stack(crops)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = arr_path.with_suffix(".tmp.npy")
    np.save(tmp, arr, allow_pickle=False)
    os.replace(tmp, arr_path)
    meta = {"photos": len(items), "no_face": missed, "records": [asdict(r) for r in records]}
    tmpj = meta_path.with_suffix(".json.tmp")
    tmpj.write_text(json.dumps(meta))
    os.replace(tmpj, meta_path)
    return arr, records
