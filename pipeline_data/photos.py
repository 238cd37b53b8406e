"""Photo folders: which files count as photos, and where the development photos live.

One list of photo suffixes for every folder walk (dataset build, ``difflora faces``, ``difflora batch``, benches):
it matches the formats :func:`pipeline_data.images.decode_image` accepts by default (JPEG, PNG, WebP, PPM/PGM).

The development photos (LFW, CelebA, ORL and a few named photos; see ``SOURCES.md`` beside them) are never part of
the repository. :func:`faces_dir` says where they are: ``$DIFFLORA_FACES`` if set, else ``../shared/data/faces``
relative to the repository root. Tests skip, with :data:`FACES_MISSING`, where they are absent.

>>> PHOTO_SUFFIXES >= {".jpg", ".png"}
True
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["FACES_ENV", "PHOTO_SUFFIXES", "faces_dir", "faces_missing", "is_photo", "list_photos"]

# lower-case suffixes of the formats decode_image accepts by default (images.DEFAULT_FORMATS)
PHOTO_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".pgm", ".ppm"})
FACES_ENV = "DIFFLORA_FACES"  # environment variable naming the development photos folder
_REPO = Path(__file__).resolve().parents[1]


def is_photo(path: Path) -> bool:
    """True for a regular file whose suffix is a photo format (case-insensitive)."""
    return path.suffix.lower() in PHOTO_SUFFIXES and path.is_file()


def list_photos(folder: str | Path) -> list[Path]:
    """The photos directly inside ``folder``, sorted by name (sub-folders and other files are skipped)."""
    return sorted(p for p in Path(folder).iterdir() if is_photo(p))


def faces_dir() -> Path:
    """The development photos: ``$DIFFLORA_FACES``, else ``<repository>/../shared/data/faces`` (may not exist)."""
    env = os.environ.get(FACES_ENV)
    return Path(env) if env else _REPO.parent / "shared" / "data" / "faces"


def faces_missing() -> str | None:
    """None where :func:`faces_dir` holds the photos, else the one reason to give for skipping what needs them."""
    root = faces_dir()
    if (root / "photos").is_dir():
        return None
    return f"face photos not found at {root} (set {FACES_ENV} to the folder holding photos/, lfw/, orl/, celeba/)"
