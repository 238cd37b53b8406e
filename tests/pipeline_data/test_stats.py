"""The one bootstrap: intervals equal an explicit resampling loop, paired samples share their resamples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline_data.stats import bootstrap_ci, mean_ci, ratio_ci


def _loop(stat, *samples, n=2000, seed=0):
    """The percentile bootstrap written out resample by resample (independent of the vectorised code)."""
    rng = np.random.default_rng(seed)
    size = len(samples[0])
    idx = rng.integers(0, size, size=(n, size))
    vals = [stat(*(np.asarray(s, dtype=np.float64)[row] for s in samples)) for row in idx]
    return tuple(float(x) for x in np.nanquantile(vals, [0.025, 0.975]))


@pytest.mark.parametrize("size", [1, 5, 40])
def test_mean_and_ratio_intervals_equal_the_loop(size: int) -> None:
    rng = np.random.default_rng(size)
    num, den = rng.normal(size=size), rng.normal(1.0, 0.2, size=size)
    got = mean_ci(num)
    assert got["mean"] == pytest.approx(num.mean()) and got["ci95"] == pytest.approx(_loop(np.mean, num))
    assert got["ci95"][0] <= got["mean"] <= got["ci95"][1]
    r = ratio_ci(num, den)
    assert r["mean"] == pytest.approx(num.sum() / den.sum())
    assert r["ci95"] == pytest.approx(_loop(lambda a, b: a.sum() / b.sum(), num, den))


def test_empty_and_zero_denominator() -> None:
    assert all(math.isnan(x) for x in bootstrap_ci([]))
    assert math.isnan(mean_ci([])["mean"])
    r = ratio_ci([0.0, 0.0], [0.0, 0.0])  # no oracle gained anything: undefined, not a crash
    assert math.isnan(r["mean"]) and all(math.isnan(x) for x in r["ci95"])


def test_seeded_and_level() -> None:
    v = np.random.default_rng(0).normal(size=30)
    assert bootstrap_ci(v) == bootstrap_ci(v) != bootstrap_ci(v, seed=1)
    lo50, hi50 = bootstrap_ci(v, level=0.5)
    lo95, hi95 = bootstrap_ci(v)
    assert lo95 < lo50 < hi50 < hi95
