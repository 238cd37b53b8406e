"""The one bootstrap: percentile intervals over identities, for the identity check and the evaluation table.

Every interval in the project's results (``ci95``) comes from :func:`bootstrap_ci`: resample the identities with
replacement ``n`` times (one seeded generator, so a table is reproducible), compute the statistic on each resample,
take the central ``level`` quantiles. Paired samples (a gain and the oracle's gain of the same identities) are
resampled with the same indices.

>>> mean_ci([0.1, 0.2, 0.3])["mean"]
0.2
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["bootstrap_ci", "mean_ci", "ratio_ci"]

Statistic = Callable[..., np.ndarray]  # resampled arrays (n, N) each -> (n,) statistics


def _mean(v: np.ndarray) -> np.ndarray:
    return v.mean(axis=1)


def _ratio_of_sums(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    d = den.sum(axis=1)
    return num.sum(axis=1) / np.where(d == 0, np.nan, d)


def bootstrap_ci(
    *samples: Sequence[float], statistic: Statistic = _mean, n: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over paired ``samples`` (default: the mean of one sample).
    Resamples where the statistic is undefined (NaN) are left out; no values give ``(nan, nan)``."""
    arrays = [np.asarray(s, dtype=np.float64) for s in samples]
    size = len(arrays[0])
    if size == 0:
        return (float("nan"), float("nan"))
    idx = np.random.default_rng(seed).integers(0, size, size=(n, size))  # (n, N) resampled identities
    stats = statistic(*(a[idx] for a in arrays))
    with warnings.catch_warnings():  # every resample undefined: the interval is (nan, nan), said by the values
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanquantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def mean_ci(values: Sequence[float]) -> dict:
    """``{"mean", "ci95"}`` of per-identity values."""
    mean = float(np.mean(values)) if len(values) else float("nan")
    return {"mean": mean, "ci95": list(bootstrap_ci(values))}


def ratio_ci(num: Sequence[float], den: Sequence[float]) -> dict:
    """``{"mean", "ci95"}`` of ``sum(num) / sum(den)`` (a ratio of means, e.g. identity recovery), resampled paired."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    mean = float(num.sum() / den.sum()) if den.sum() else float("nan")
    return {"mean": mean, "ci95": list(bootstrap_ci(num, den, statistic=_ratio_of_sums))}
