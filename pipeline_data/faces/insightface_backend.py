"""insightface backend: SCRFD detector + ArcFace 512-d recogniser from a local model-pack directory.

The pack is read from disk only (never downloaded). Layouts of the public packs:

* ``buffalo_l/``: ``det_10g.onnx`` (SCRFD-10G) + ``w600k_r50.onnx`` (ArcFace R50, WebFace600K)
* ``antelopev2/``: ``scrfd_10g_bnkps.onnx`` + ``glintr100.onnx`` (ArcFace R100, Glint360K); its zip sometimes
  unpacks to ``antelopev2/antelopev2/`` — a single nested folder is followed.
* ``buffalo_m/``, ``buffalo_s/``: ``det_2.5g.onnx`` / ``det_500m.onnx`` + ``w600k_r50.onnx`` / ``w600k_mbf.onnx``

Other ``*.onnx`` files (landmarks, gender/age) are ignored. Unknown names still work: every ``*.onnx`` is routed
through insightface's ``model_zoo.get_model`` and the first detection and recognition models are used.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline_data.faces.base import BackendUnavailableError, Face, FaceEncoder

__all__ = ["ARCFACE_TEMPLATE", "KNOWN_PACKS", "InsightFaceEncoder", "find_pack_files"]

# pack name -> (detection file, recognition file)
KNOWN_PACKS: dict[str, tuple[str, str]] = {
    "buffalo_l": ("det_10g.onnx", "w600k_r50.onnx"),
    "antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx"),
    "buffalo_m": ("det_2.5g.onnx", "w600k_r50.onnx"),
    "buffalo_s": ("det_500m.onnx", "w600k_mbf.onnx"),
}
DEFAULT_DIR_ENV = "DIFFLORA_INSIGHTFACE_DIR"  # environment variable naming the default pack directory
DEFAULT_DIR = Path("~/.insightface/models/buffalo_l")  # insightface's own cache location for buffalo_l

# ArcFace's 5-point template in a 112x112 chip: left eye, right eye, nose tip, left/right mouth corners.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
# Cosine verification threshold for ArcFace embeddings. Public packs are not available here, so it is not
# calibrated by bench/faces.py on this machine: 0.32 is deepface's ArcFace value (cosine distance 0.68).
# Re-calibrate with `python bench/faces.py --backend insightface --model-dir DIR` on a host that has the pack.
ARCFACE_COSINE_THRESHOLD = 0.32


def _expected_text() -> str:
    return "; ".join(f"{name}: {det} + {rec}" for name, (det, rec) in KNOWN_PACKS.items())


def find_pack_files(model_dir: str | Path) -> tuple[Path, Path | None, Path | None]:
    """Resolve ``(pack_dir, detection_file, recognition_file)`` by the known layouts (None where not found)."""
    d = Path(model_dir).expanduser()
    if not d.is_dir():
        raise BackendUnavailableError(
            f"insightface model pack not found: {d} is not a directory (expected {_expected_text()})",
            directory=d,
            expected=[f for pair in KNOWN_PACKS.values() for f in pair],
        )
    onnx_files = sorted(d.glob("*.onnx"))
    subdirs = [p for p in d.iterdir() if p.is_dir()]
    if not onnx_files and len(subdirs) == 1 and any(subdirs[0].glob("*.onnx")):
        d, onnx_files = subdirs[0], sorted(subdirs[0].glob("*.onnx"))  # antelopev2/antelopev2/
    names = {p.name for p in onnx_files}
    det = next((d / det for det, _ in KNOWN_PACKS.values() if det in names), None)
    rec = next((d / rec for _, rec in KNOWN_PACKS.values() if rec in names), None)
    return d, det, rec


class InsightFaceEncoder(FaceEncoder):
    """SCRFD + ArcFace through insightface's ``model_zoo`` loading code. 512-d, cosine threshold 0.32."""

    name = "insightface"
    dim = 512
    threshold = ARCFACE_COSINE_THRESHOLD
    min_face_px = 16  # SCRFD finds small faces; ArcFace upsamples the chip to 112
    chip_size = 112

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        det_size: tuple[int, int] = (640, 640),
        det_thresh: float = 0.5,
        providers: Sequence[str] | None = None,
    ) -> None:
        """
        Args:
            model_dir: the pack folder (default: ``$DIFFLORA_INSIGHTFACE_DIR`` or ``~/.insightface/models/buffalo_l``).
            det_size: detector input (width, height); the image is letterboxed into it.
            det_thresh: minimum detection score.
            providers: onnxruntime execution providers (default: CUDA when available, else CPU).
        """
        super().__init__()
        if model_dir is None:
            model_dir = os.environ.get(DEFAULT_DIR_ENV) or DEFAULT_DIR
        pack, det_file, rec_file = find_pack_files(model_dir)
        try:
            import onnxruntime
            from insightface.model_zoo import model_zoo
        except ImportError as e:
            raise BackendUnavailableError(
                f"the insightface backend needs insightface and onnxruntime (pip install insightface onnxruntime): "
                f"{e}",
                directory=pack,
            ) from None
        if providers is None:
            avail = onnxruntime.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in avail]
        self.providers = list(providers)
        self.model_dir = pack
        det_model = rec_model = None
        candidates = [p for p in (det_file, rec_file) if p is not None]
        if det_file is None or rec_file is None:  # unknown names: route every model by its inputs/outputs
            candidates += [p for p in sorted(pack.glob("*.onnx")) if p not in candidates]
        for path in candidates:
            if det_model is not None and rec_model is not None:
                break
            try:
                model = model_zoo.get_model(str(path), providers=self.providers)
            except Exception as e:  # noqa: BLE001 - a damaged file must name itself
                raise BackendUnavailableError(
                    f"insightface could not load {path} ({type(e).__name__}: {e})", directory=pack
                ) from None
            task = getattr(model, "taskname", None)
            if task == "detection" and det_model is None:
                det_model = model
            elif task == "recognition" and rec_model is None:
                rec_model = model
        missing = [what for what, m in (("detection", det_model), ("recognition", rec_model)) if m is None]
        if missing:
            found = ", ".join(sorted(p.name for p in pack.glob("*.onnx"))) or "no .onnx files"
            raise BackendUnavailableError(
                f"incomplete insightface model pack in {pack}: no {' or '.join(missing)} model (found {found}; "
                f"expected {_expected_text()})",
                directory=pack,
                expected=[f for pair in KNOWN_PACKS.values() for f in pair],
            )
        ctx_id = 0 if "CUDAExecutionProvider" in self.providers else -1
        det_model.prepare(ctx_id, input_size=tuple(det_size), det_thresh=det_thresh)
        rec_model.prepare(ctx_id)
        self._det = det_model
        self._rec = rec_model
        self.det_size = tuple(det_size)
        self.chip_size = int(rec_model.input_size[0])
        self.dim = int(rec_model.output_shape[-1]) if isinstance(rec_model.output_shape[-1], int) else self.dim

    def detect(self, rgb: np.ndarray) -> list[Face]:
        rgb = self.load_rgb(rgb)
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # insightface works on OpenCV BGR images
        with self._lock:
            dets, kpss = self._det.detect(bgr, input_size=self.det_size)
        faces = []
        for i, d in enumerate(dets):
            kps = None if kpss is None else np.asarray(kpss[i], dtype=np.float32).reshape(5, 2)
            faces.append(Face(tuple(float(v) for v in d[:4]), float(d[4]), kps))
        faces.sort(key=lambda f: f.area, reverse=True)
        return faces

    def _landmarks(self, face: Face) -> np.ndarray:
        if face.landmarks is not None and np.asarray(face.landmarks).shape == (5, 2):
            return np.asarray(face.landmarks, dtype=np.float32)
        # No keypoints (e.g. a box from elsewhere): place the template inside the box.
        x0, y0, x1, y1 = face.box
        return (ARCFACE_TEMPLATE / 112.0) * np.array([x1 - x0, y1 - y0], np.float32) + np.array([x0, y0], np.float32)

    def align(self, rgb: np.ndarray, face: Face, size: int = 64, padding: float = 0.25) -> np.ndarray:
        """Similarity-warp the 5 keypoints onto ArcFace's template; ``padding`` widens the frame on each side."""
        import cv2

        if size < 8:
            raise ValueError(f"size must be >= 8, got {size}")
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        rgb = self.load_rgb(rgb)
        dst = (ARCFACE_TEMPLATE / 112.0 + padding) / (1.0 + 2.0 * padding) * size  # (5, 2)
        m, _ = cv2.estimateAffinePartial2D(self._landmarks(face), dst, method=cv2.LMEDS)
        if m is None:
            raise ValueError("cannot align: degenerate landmarks")
        return cv2.warpAffine(rgb, m, (size, size), flags=cv2.INTER_LINEAR, borderValue=0.0)

    def _recognition_chip(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        from insightface.utils import face_align

        return face_align.norm_crop(rgb, landmark=self._landmarks(face), image_size=self.chip_size)  # ArcFace's own

    def _embed_chips(self, chips: Sequence[np.ndarray]) -> np.ndarray:
        bgr = [np.ascontiguousarray(np.asarray(c, dtype=np.uint8)[:, :, ::-1]) for c in chips]
        with self._lock:
            out = self._rec.get_feat(bgr)  # (N, D)
        return np.asarray(out, dtype=np.float32).reshape(len(chips), -1)
