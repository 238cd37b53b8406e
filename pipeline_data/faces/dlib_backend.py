"""dlib backend: HOG detector, 5-point landmarks, ResNet 128-d descriptor (models from face-recognition-models).

Works offline on a CPU. The descriptor runs on a PyTorch port of dlib's ResNet (``recognizer="torch"``: weights
read from the same .dat, same numbers to ~1e-6, ~20x faster than dlib's own net, which is built without BLAS and
holds the GIL); ``recognizer="dlib"`` or ``num_jitters > 0`` use dlib's net. Small photos (ORL 92x112, LFW
150x150) are upsampled for detection; large ones are detected on a downscaled copy and landmarked at full
resolution.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline_data.faces.base import BackendUnavailableError, Face, FaceEncoder

__all__ = ["DLIB_MODEL_FILES", "RECOGNIZERS", "DlibEncoder", "find_dlib_models"]

log = logging.getLogger(__name__)

LANDMARKS_FILE = "shape_predictor_5_face_landmarks.dat"
RECOGNITION_FILE = "dlib_face_recognition_resnet_model_v1.dat"
DLIB_MODEL_FILES = (LANDMARKS_FILE, RECOGNITION_FILE)
RECOGNIZERS = ("torch", "dlib")  # the descriptor net: the PyTorch port of dlib's ResNet, or dlib's own

# dlib's published threshold is Euclidean distance 0.6 on its raw descriptors, whose norm is ~1.4 (mean 1.45,
# range 1.25-1.67 on the bench sample). On L2-normalised vectors d = NORM * sqrt(2 - 2 cos), so d = 0.6 <-> cos
# 0.908 at NORM 1.40. bench/faces.py (1,440 LFW/CelebA/ORL pairs): 97.1% accuracy at 0.908, best 97.3% at 0.91.
DLIB_DISTANCE_THRESHOLD = 0.6
DLIB_DESCRIPTOR_NORM = 1.40
DLIB_COSINE_THRESHOLD = round(1.0 - (DLIB_DISTANCE_THRESHOLD / DLIB_DESCRIPTOR_NORM) ** 2 / 2.0, 3)


def find_dlib_models(model_dir: str | Path | None = None) -> Path:
    """The folder holding dlib's .dat models: ``model_dir``, else face_recognition_models' ``models/``.

    ``face_recognition_models`` is located with ``importlib.util.find_spec``, never imported (its ``__init__``
    needs ``pkg_resources``, which recent setuptools no longer ships).
    """
    if model_dir is None:
        spec = importlib.util.find_spec("face_recognition_models")
        if spec is None or not spec.submodule_search_locations:
            raise BackendUnavailableError(
                "the dlib backend needs the 'face-recognition-models' package (pip install face-recognition-models)"
                " or model_dir=<folder with " + ", ".join(DLIB_MODEL_FILES) + ">",
                expected=DLIB_MODEL_FILES,
            )
        model_dir = Path(next(iter(spec.submodule_search_locations))) / "models"
    model_dir = Path(model_dir)
    missing = [f for f in DLIB_MODEL_FILES if not (model_dir / f).is_file()]
    if missing:
        raise BackendUnavailableError(
            f"dlib models missing in {model_dir}: {', '.join(missing)} (expected {', '.join(DLIB_MODEL_FILES)})",
            directory=model_dir,
            expected=DLIB_MODEL_FILES,
        )
    return model_dir


class DlibEncoder(FaceEncoder):
    """dlib HOG + 5-point landmarks + ResNet descriptor. 128-d, cosine threshold 0.908 (= dlib distance 0.6)."""

    name = "dlib"
    dim = 128
    threshold = DLIB_COSINE_THRESHOLD
    min_face_px = 32  # HOG with 2x upsampling finds ~40 px faces; below 32 px descriptors are unreliable
    chip_size = 150  # dlib's ResNet expects 150x150 chips made by get_face_chip(padding=0.25)

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        detect_max_side: int = 800,
        max_upsample: int = 2,
        max_detect_pixels: int = 2_500_000,
        adjust_threshold: float = 0.0,
        num_jitters: int = 0,
        recognizer: str = "torch",
    ) -> None:
        """
        Args:
            model_dir: folder with the .dat files (default: face_recognition_models' ``models/``).
            detect_max_side: larger images are downscaled to this longer side for detection (speed).
            max_upsample: at most this many 2x upsamplings when no face is found (small photos).
            max_detect_pixels: never upsample beyond this many pixels.
            adjust_threshold: HOG detector threshold offset (negative finds more, less certain faces).
            num_jitters: descriptor jitter (0 = one pass; 10 is ~1% more accurate and 10x slower). Jitter is
                dlib's random augmentation, so ``num_jitters > 0`` always runs dlib's own net.
            recognizer: ``"torch"`` (PyTorch port of dlib's ResNet, same descriptors, much faster; falls back to
                dlib's net with a warning if the .dat cannot be converted) or ``"dlib"`` (dlib's own net).
        """
        if recognizer not in RECOGNIZERS:
            raise ValueError(f"unknown recognizer {recognizer!r}; choose one of {', '.join(RECOGNIZERS)}")
        super().__init__()
        try:
            import dlib
        except ImportError as e:  # pragma: no cover - dlib-bin is a declared dependency of the faces extra
            raise BackendUnavailableError(f"the dlib backend needs dlib-bin (pip install dlib-bin): {e}") from None
        self.model_dir = find_dlib_models(model_dir)
        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._shape = dlib.shape_predictor(str(self.model_dir / LANDMARKS_FILE))
        self._rec = None  # dlib's own descriptor net, loaded on first use (recognizer="dlib" or jitter)
        self._torch_rec = None
        self._torch_lock = threading.Lock()  # one forward at a time (torch threads), concurrent with dlib calls
        if recognizer == "torch":
            from pipeline_data.faces.dlib_resnet import DlibFaceResNet

            try:
                self._torch_rec = DlibFaceResNet.from_dat(self.model_dir / RECOGNITION_FILE)
            except Exception as e:  # an unexpected .dat layout (ValueError) or anything else: dlib still works
                log.warning("dlib face backend: the PyTorch descriptor net cannot be built, using dlib's: %s", e)
                recognizer = "dlib"
        self.recognizer = recognizer
        if recognizer == "dlib":
            self._dlib_rec()
        self.detect_max_side = detect_max_side
        self.max_upsample = max_upsample
        self.max_detect_pixels = max_detect_pixels
        self.adjust_threshold = adjust_threshold
        self.num_jitters = num_jitters

    def _rect(self, box: Sequence[float]):
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        return self._dlib.rectangle(x0, y0, x1 - 1, y1 - 1)

    def landmarks(self, rgb: np.ndarray, box: Sequence[float]) -> np.ndarray:
        """5-point landmarks ``(5, 2)`` for a face box."""
        with self._lock:
            shape = self._shape(rgb, self._rect(box))
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)

    def detect(self, rgb: np.ndarray) -> list[Face]:
        rgb = self.load_rgb(rgb)
        h, w = rgb.shape[:2]
        scale = min(1.0, self.detect_max_side / max(h, w))
        img = rgb
        if scale < 1.0:
            img = np.asarray(
                Image.fromarray(rgb).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
            )
        short = min(img.shape[:2])
        start = 0 if short >= 300 else (1 if short >= 140 else 2)
        start = min(start, self.max_upsample)
        rects, scores = [], []
        with self._lock:
            for up in range(start, self.max_upsample + 1):
                if up > start and img.shape[0] * img.shape[1] * 4**up > self.max_detect_pixels:
                    break
                rects, scores, _ = self._detector.run(img, up, self.adjust_threshold)
                if len(rects):
                    break
            faces = []
            for r, s in zip(rects, scores):
                box = (r.left() / scale, r.top() / scale, (r.right() + 1) / scale, (r.bottom() + 1) / scale)
                shape = self._shape(rgb, self._rect(box))
                lm = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)  # (5, 2)
                faces.append(Face(tuple(float(v) for v in box), float(s), lm))
        faces.sort(key=lambda f: f.area, reverse=True)
        return faces

    def _full_object(self, rgb: np.ndarray, face: Face):
        lm = face.landmarks if face.landmarks is not None else self.landmarks(rgb, face.box)
        pts = self._dlib.points([self._dlib.point(int(round(x)), int(round(y))) for x, y in lm])
        return self._dlib.full_object_detection(self._rect(face.box), pts)

    def align(self, rgb: np.ndarray, face: Face, size: int = 64, padding: float = 0.25) -> np.ndarray:
        """dlib.get_face_chip: eyes level and centred; ``padding=0.25`` is the descriptor's own framing."""
        if size < 8:
            raise ValueError(f"size must be >= 8, got {size}")
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        rgb = self.load_rgb(rgb)
        with self._lock:
            chip = self._dlib.get_face_chip(rgb, self._full_object(rgb, face), size=size, padding=padding)
        return np.asarray(chip, dtype=np.uint8)

    def _recognition_chip(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        return self.align(rgb, face, size=self.chip_size, padding=0.25)

    def _dlib_rec(self):
        """dlib's own ResNet (loaded once, under the lock)."""
        with self._lock:
            if self._rec is None:
                self._rec = self._dlib.face_recognition_model_v1(str(self.model_dir / RECOGNITION_FILE))
            return self._rec

    def _embed_chips(self, chips: Sequence[np.ndarray]) -> np.ndarray:
        chips = [np.ascontiguousarray(c, dtype=np.uint8) for c in chips]
        if self._torch_rec is not None and self.num_jitters <= 0:
            if not chips:
                return np.zeros((0, self.dim), np.float32)
            with self._torch_lock:  # torch releases the GIL: detection (self._lock) can run meanwhile
                return self._torch_rec.embed(chips)
        rec = self._dlib_rec()
        with self._lock:
            vecs = rec.compute_face_descriptor(chips, self.num_jitters)
        return np.array([np.asarray(v, dtype=np.float32) for v in vecs], dtype=np.float32).reshape(len(chips), -1)

    def distance(self, a: np.ndarray, b: np.ndarray) -> float:
        """dlib's Euclidean distance on the typical descriptor scale (same person below 0.6)."""
        return DLIB_DESCRIPTOR_NORM * float(np.sqrt(max(0.0, 2.0 - 2.0 * float(self.similarity(a, b)))))
