"""Where the tests find the development face photos, and the one way they skip where the photos are absent.

The photos live outside the repository (``$DIFFLORA_FACES``, default ``../shared/data/faces``; see
:mod:`pipeline_data.photos`). Mark a test ``@needs_faces`` (or a module ``pytestmark = needs_faces``); call
:func:`require_faces` first thing in a fixture that reads them, so every test using the fixture skips too.
"""

from __future__ import annotations

import pytest

from pipeline_data.photos import faces_dir, faces_missing

FACES = faces_dir()  # photos/, lfw/, orl/, celeba/
PHOTOS = FACES / "photos"  # a few named photos (obama*.jpg, alex*.jpg/png, ...)
MISSING = faces_missing()  # None, or why the photo tests are skipped
needs_faces = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


def require_faces() -> None:
    """Skip the calling test or fixture where the photos are absent."""
    if MISSING is not None:
        pytest.skip(MISSING)
