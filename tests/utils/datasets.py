"""The bundled tiny base and a small real adapter dataset, for tests of every package."""

from __future__ import annotations

import os
from pathlib import Path

from tests.utils.faces import FACES

REPO = Path(__file__).resolve().parents[2]
# three identity folders: two LFW people (one with >= 8 photos) and one ORL subject
DATASET_IDS = [FACES / "lfw" / "Aaron_Peirsol", FACES / "lfw" / "Abdullah_Gul", FACES / "orl" / "s1"]


def tiny_base() -> str:
    """The bundled tiny base model (``DIFFLORA_TEST_BASE`` may point elsewhere while developing)."""
    from pipeline_data.models import TINY_BASE

    return os.environ.get("DIFFLORA_TEST_BASE", str(TINY_BASE))


def build_config(**kw):
    from pipeline_data.recipe import BuildConfig

    # threads=1 everywhere: Ray workers and the killed-build subprocess run one torch thread, and builds are compared
    # element-wise across them (2 threads sum in another order: 1.8e-5 apart after 12 steps)
    base = {"base": tiny_base(), "steps": 12, "batch_size": 4, "check_identities": 0, "threads": 1}
    return BuildConfig(**{**base, **kw})
