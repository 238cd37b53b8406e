"""The ``FaceEncoder`` interface, its result types and typed errors (shared by every backend)."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline_data.images import decode_image

__all__ = [
    "BackendUnavailableError",
    "Face",
    "FaceEncoder",
    "FaceError",
    "FaceResult",
    "FaceTooSmallError",
    "NoFaceError",
    "l2_normalize",
]

ImageInput = np.ndarray | bytes | str | Path


class FaceError(ValueError):
    """A photo that cannot give a face embedding. ``code`` is stable (the service maps it to HTTP 422)."""

    code = "face_error"


class NoFaceError(FaceError):
    """No face was found in the photo."""

    code = "no_face"


class FaceTooSmallError(FaceError):
    """The face (or the whole image) is smaller than the backend can embed reliably."""

    code = "face_too_small"


class BackendUnavailableError(RuntimeError):
    """A backend's models cannot be loaded. ``directory`` and ``expected`` say where and what was looked for."""

    code = "backend_unavailable"

    def __init__(self, message: str, *, directory: str | Path | None = None, expected: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.directory = None if directory is None else Path(directory)
        self.expected = list(expected)


@dataclass(frozen=True)
class Face:
    """One detected face, in the pixel coordinates of the image it was found in."""

    box: tuple[float, float, float, float]  # (x0, y0, x1, y1), x1/y1 exclusive
    score: float  # detector confidence (dlib: HOG SVM margin; insightface: probability)
    landmarks: np.ndarray | None = None  # (K, 2) float32 x, y; dlib K=5 (eye corners, nose), insightface K=5

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def area(self) -> float:
        return max(0.0, self.width) * max(0.0, self.height)

    def to_dict(self) -> dict:
        return {
            "box": [round(float(v), 2) for v in self.box],
            "score": round(float(self.score), 4),
            "landmarks": None if self.landmarks is None else np.round(self.landmarks, 2).tolist(),
        }


@dataclass
class FaceResult:
    """The embedding of the face chosen in one photo."""

    embedding: np.ndarray  # (D,) float32, L2-normalised
    face: Face  # the face that was embedded
    backend: str  # "dlib" | "insightface"
    image_size: tuple[int, int]  # (width, height) of the decoded photo
    num_faces: int = 1  # faces detected in the photo
    warnings: list[str] = field(default_factory=list)  # e.g. "3 faces found; using the largest"

    def to_dict(self, *, embedding: bool = True) -> dict:
        d = {
            "backend": self.backend,
            "image_size": list(self.image_size),
            "num_faces": self.num_faces,
            "face": self.face.to_dict(),
            "warnings": list(self.warnings),
        }
        if embedding:
            d["embedding"] = [round(float(v), 6) for v in self.embedding]
        return d


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """L2-normalise along ``axis`` (float32); a zero vector stays zero."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(n, 1e-12)


class FaceEncoder(ABC):
    """Detect → align → embed. Subclasses set ``name``, ``dim``, ``threshold`` and implement the four hooks.

    Similarity is the cosine of the L2-normalised embeddings for every backend; ``threshold`` is the backend's
    verification threshold on that cosine (same person iff ``similarity >= threshold``).
    """

    name: str = "base"
    dim: int = 0  # embedding size
    threshold: float = 0.5  # verification threshold on cosine similarity
    min_face_px: int = 20  # smaller faces raise FaceTooSmallError
    chip_size: int = 150  # the recogniser's input size (square)

    def __init__(self) -> None:
        self._lock = threading.RLock()  # the native models are not re-entrant; one call at a time per encoder

    # --- backend hooks -------------------------------------------------------------------------------------
    @abstractmethod
    def detect(self, rgb: np.ndarray) -> list[Face]:
        """All faces in an RGB uint8 ``(H, W, 3)`` image, largest first."""

    @abstractmethod
    def align(self, rgb: np.ndarray, face: Face, size: int = 64, padding: float = 0.25) -> np.ndarray:
        """An aligned square crop ``(size, size, 3)`` uint8 of ``face``; ``padding`` adds context around it."""

    @abstractmethod
    def _embed_chips(self, chips: Sequence[np.ndarray]) -> np.ndarray:
        """Raw (unnormalised) embeddings ``(N, D)`` of recogniser-ready chips ``(chip_size, chip_size, 3)``."""

    @abstractmethod
    def _recognition_chip(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        """The recogniser's aligned input chip for ``face``."""

    # --- shared behaviour ----------------------------------------------------------------------------------
    @staticmethod
    def load_rgb(image: ImageInput, **decode_kw) -> np.ndarray:
        """Accept an RGB array, encoded bytes or a path; return RGB uint8 ``(H, W, 3)``."""
        if isinstance(image, np.ndarray):
            if image.ndim == 2:
                image = np.repeat(image[:, :, None], 3, axis=2)
            if image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"expected an RGB array (H, W, 3), got shape {image.shape}")
            if image.dtype != np.uint8:
                raise ValueError(f"expected a uint8 RGB array, got dtype {image.dtype}")
            return np.ascontiguousarray(image)
        return decode_image(image, **decode_kw)

    def similarity(self, a: np.ndarray, b: np.ndarray) -> float | np.ndarray:
        """Cosine similarity of embeddings (broadcasts over leading axes)."""
        a, b = l2_normalize(a), l2_normalize(b)
        return np.sum(a * b, axis=-1) if a.ndim > 1 or b.ndim > 1 else float(np.dot(a, b))

    def same_person(self, a: np.ndarray, b: np.ndarray) -> bool:
        """``similarity(a, b) >= threshold``."""
        return bool(self.similarity(a, b) >= self.threshold)

    def select_face(self, faces: list[Face], image_size: tuple[int, int]) -> tuple[Face, list[str]]:
        """Pick the largest face; warn when there are several; refuse faces below ``min_face_px``."""
        w, h = image_size
        if not faces:
            if min(w, h) < self.min_face_px:
                raise FaceTooSmallError(
                    f"image is {w}x{h} px; the {self.name} backend needs faces of at least {self.min_face_px} px"
                )
            raise NoFaceError(f"no face found in the {w}x{h} image")
        face = max(faces, key=lambda f: f.area)
        warns = []
        if len(faces) > 1:
            warns.append(f"{len(faces)} faces found; using the largest ({face.width:.0f}x{face.height:.0f} px)")
        if min(face.width, face.height) < self.min_face_px:
            raise FaceTooSmallError(
                f"face is {face.width:.0f}x{face.height:.0f} px; the {self.name} backend needs at least "
                f"{self.min_face_px} px"
            )
        return face, warns

    def embed(self, image: ImageInput, face: Face | None = None) -> FaceResult:
        """Embed the largest face of a photo (or the given ``face``). Raises NoFaceError / FaceTooSmallError."""
        rgb = self.load_rgb(image)
        h, w = rgb.shape[:2]
        warns: list[str] = []
        num = 1
        if face is None:
            faces = self.detect(rgb)
            num = len(faces)
            face, warns = self.select_face(faces, (w, h))
        chip = self._recognition_chip(rgb, face)
        emb = l2_normalize(self._embed_chips([chip])[0])
        return FaceResult(emb, face, self.name, (w, h), num, warns)

    def embed_many(self, images: Iterable[ImageInput], *, errors: str = "raise") -> list[FaceResult | Exception]:
        """Embed several photos, batching the recogniser. ``errors="return"`` puts the exception in the list."""
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        out: list[FaceResult | Exception] = []
        pending: list[tuple[int, np.ndarray, Face, tuple[int, int], int, list[str]]] = []
        for image in images:
            try:
                rgb = self.load_rgb(image)
                h, w = rgb.shape[:2]
                faces = self.detect(rgb)
                face, warns = self.select_face(faces, (w, h))
                pending.append((len(out), self._recognition_chip(rgb, face), face, (w, h), len(faces), warns))
                out.append(None)  # type: ignore[arg-type]
            except (ValueError, FaceError) as e:
                if errors == "raise":
                    raise
                out.append(e)
        if pending:
            embs = l2_normalize(self._embed_chips([p[1] for p in pending]))  # (N, D)
            for (i, _, face, size, num, warns), e in zip(pending, embs):
                out[i] = FaceResult(e, face, self.name, size, num, warns)
        return out

    def embed_image_as_face(self, rgb: np.ndarray) -> np.ndarray:
        """Embedding ``(D,)`` of a whole image taken as an already aligned face chip (no detection).

        For small generated or pre-aligned crops (e.g. 64x64 made by ``align(..., padding=0.25)``) where detection
        fails: the image is resized to the recogniser's chip size and embedded as is.
        """
        return self.embed_images_as_faces([rgb])[0]

    def embed_images_as_faces(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Batched ``embed_image_as_face``: ``(N, D)`` L2-normalised."""
        from PIL import Image

        chips = []
        for rgb in images:
            rgb = self.load_rgb(rgb)
            if rgb.shape[:2] != (self.chip_size, self.chip_size):
                rgb = np.asarray(
                    Image.fromarray(rgb).resize((self.chip_size, self.chip_size), Image.Resampling.BICUBIC)
                )
            chips.append(np.ascontiguousarray(rgb))
        if not chips:
            return np.zeros((0, self.dim), np.float32)
        return l2_normalize(self._embed_chips(chips))
