"""A short soak (``bench/reliability.py --soak`` runs 1,000 switches and 500 generations): 100 identity switches
(apply / restore) with 20 generations on the real tiny pipeline; the UNet comes back bit for bit and fixed-seed images
are unchanged at the end."""

from __future__ import annotations

import pytest

from tests.reliability.soak import run_soak, write_adapters


@pytest.fixture(scope="module")
def pipe(tiny_world):
    from pipeline_data.models import load_pipeline

    return load_pipeline(tiny_world["model_path"])


def test_short_soak_restores_exactly_and_keeps_outputs(pipe, tmp_path):
    files = write_adapters(pipe.unet, tmp_path, k=3)
    out = run_soak(pipe, files, switches=100, generations=20, steps=2, size=32, warmup=0.2)
    assert out["switches"] == 100 and out["generations"] == 20 and out["restores"] == 25, out
    assert out["adapter_changes_image"] > 0.005, out  # the adapters really change the image: the check is not vacuous
    assert out["exact_restore"], out
    assert out["fixed_seed_base_unchanged"] and out["fixed_seed_identity_unchanged"], out
    assert out["rss_growth_pct"] < 10, out  # loose here (short run, pytest around it); the bench bounds it at 2%
