"""Faces: detect → align → embed, with interchangeable backends (``dlib`` default, ``insightface``).

>>> enc = get_encoder("dlib")
>>> faces = enc.detect(rgb)                      # list[Face], largest first
>>> chip = enc.align(rgb, faces[0], size=64)     # (64, 64, 3) uint8, aligned
>>> res = enc.embed(rgb)                         # FaceResult: L2-normalised embedding + the face used
>>> ident = build_identity(enc, [p1, p2, p3])    # outliers flagged, aggregated embedding, consistency
"""

from __future__ import annotations

import threading

from pipeline_data.faces.base import (
    BackendUnavailableError,
    Face,
    FaceEncoder,
    FaceError,
    FaceResult,
    FaceTooSmallError,
    NoFaceError,
    l2_normalize,
)
from pipeline_data.faces.identity import IdentityResult, PhotoResult, build_identity, similarity

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "Face",
    "FaceEncoder",
    "FaceError",
    "FaceResult",
    "FaceTooSmallError",
    "IdentityResult",
    "NoFaceError",
    "PhotoResult",
    "build_identity",
    "get_encoder",
    "l2_normalize",
    "similarity",
]

# backend name -> "module:class"
BACKENDS: dict[str, str] = {
    "dlib": "pipeline_data.faces.dlib_backend:DlibEncoder",
    "insightface": "pipeline_data.faces.insightface_backend:InsightFaceEncoder",
}

_cache: dict[tuple, FaceEncoder] = {}
_cache_lock = threading.Lock()


def get_encoder(backend: str = "dlib", *, cached: bool = True, **kw) -> FaceEncoder:
    """A face encoder for ``backend`` ("dlib" | "insightface"); keyword arguments go to its constructor.

    With ``cached=True`` (default) the same instance is returned for the same arguments (models load once).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown face backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    key = (backend, tuple(sorted((k, str(v)) for k, v in kw.items())))
    with _cache_lock:
        if cached and key in _cache:
            return _cache[key]
        import importlib

        mod_name, cls_name = BACKENDS[backend].split(":")
        enc = getattr(importlib.import_module(mod_name), cls_name)(**kw)
        if cached:
            _cache[key] = enc
        return enc
