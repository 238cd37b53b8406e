"""Weight-space metrics between predicted and true adapters (raw tokens, real entries only)."""

from __future__ import annotations

import torch
from torch import Tensor


def _cos(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine of (B, K) tensors -> (B,)."""
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)


def weight_metrics(pred: Tensor, target: Tensor, mask: Tensor, mean: Tensor) -> dict[str, list[float]]:
    """Per-identity metrics. pred, target (B, T, D) raw tokens; mask (T, D); mean (T, D) training-set mean.

    * ``cosine``: cosine(pred, target) over real entries (the design's weight-space cosine);
    * ``centered_cosine``: cosine(pred - mean, target - mean): does the prediction move from the mean adapter
      toward this identity? (0 for the mean adapter itself);
    * ``rel_mse``: ||pred - target||^2 / ||target - mean||^2 (1.0 for the mean adapter, 0 for perfect).
    """
    m = mask.bool().reshape(-1)  # (T*D,)
    p = pred.float().reshape(pred.shape[0], -1)[:, m]  # (B, K)
    t = target.float().reshape(target.shape[0], -1)[:, m]  # (B, K)
    mu = mean.float().reshape(-1)[m][None]  # (1, K)
    rel = ((p - t) ** 2).sum(1) / ((t - mu) ** 2).sum(1).clamp_min(1e-12)  # (B,)
    return {
        "cosine": _cos(p, t).tolist(),
        "centered_cosine": _cos(p - mu, t - mu).tolist(),
        "rel_mse": rel.tolist(),
    }


def summarize(per_identity: dict[str, list[float]]) -> dict[str, float]:
    """Mean of every per-identity metric."""
    return {k: float(torch.tensor(v).mean()) for k, v in per_identity.items()}
