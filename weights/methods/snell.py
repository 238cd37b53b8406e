"""SNELL, sparse kernelised LoRA (NeurIPS 2024, ssfgunner/SNELL): W' = W + ΔŴ (docs/weights.md §1.8).

Kernel: two heads h = 1, 2 with ``a1``, ``a2`` (n_flat, r/2) and ``b1``, ``b2`` (m, r/2), all trainable;
ΔW[j, i] = 0.1·‖a1_i − b1_j‖₂ − 0.1·‖a2_i − b2_j‖₂ (difference of two Euclidean-distance kernels).
Competition-based sparsification with ratio s = ``params["sparsity"]`` (default 0.5): t = the s-quantile of
|ΔW| with torch.quantile's interpolation, found with torch.kthvalue (torch.quantile refuses > 2^24 elements),
ΔŴ = ΔW ⊙ sg(|ΔW|·1[|ΔW| > t]); s = 0 gives the plain kernel ΔŴ = ΔW. Init: kaiming-uniform(a=sqrt 5) of the
heads stacked as the reference does (fan_in n·r/2 and m·r/2) ⇒ ΔW ≠ 0 at init — the one documented exception
(``zero_init = False``). Conv2d: matrix view (merged-weight forward). r must be even.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from .base import AdapterMethod, MethodConfig, kaiming_uniform, like

KERNEL_COEFS = (0.1, -0.1)  # c_h of the two distance kernels (fixed, as the reference code)


def quantile(x: Tensor, q: float) -> Tensor:
    """``torch.quantile(x, q)`` (linear interpolation between order statistics) by kthvalue: no 2^24 size limit."""
    flat = x.flatten()
    pos = q * (flat.numel() - 1)
    lo = math.floor(pos)
    v = torch.kthvalue(flat, lo + 1).values  # () the (lo+1)-th smallest
    if pos > lo:
        v = v + (pos - lo) * (torch.kthvalue(flat, lo + 2).values - v)
    return v


def sparsify(dW: Tensor, sparsity: float) -> Tensor:
    """ΔW ⊙ sg(|ΔW| · 1[|ΔW| > t]), t = the ``sparsity``-quantile of |ΔW| (as the reference's torch.quantile)."""
    if sparsity <= 0:
        return dW
    mag = dW.detach().abs()
    t = quantile(mag, sparsity)  # () threshold
    return dW * (mag * (mag > t))


def kernel_delta(p: dict[str, Tensor]) -> Tensor:
    """Dense kernel ΔW (m, n_flat) in fp32."""
    dW = None
    for h, c in enumerate(KERNEL_COEFS, start=1):
        a, b = p[f"a{h}"].float(), p[f"b{h}"].float()  # (n_flat, r/2), (m, r/2)
        dist = torch.cdist(b[None], a[None], compute_mode="donot_use_mm_for_euclid_dist")[0]  # (m, n_flat)
        dW = c * dist if dW is None else dW + c * dist
    return dW


class SNELL(AdapterMethod):
    name: ClassVar[str] = "snell"
    param_keys: ClassVar[tuple[str, ...]] = ("sparsity",)
    trainable: ClassVar[tuple[str, ...]] = ("a1", "a2", "b1", "b2")
    supports_conv: ClassVar[bool] = True
    zero_init: ClassVar[bool] = False

    def check_shape(self, shape: tuple[int, ...], cfg: MethodConfig) -> None:
        super().check_shape(shape, cfg)
        if cfg.rank % 2:
            raise ValueError(f"snell: rank must be even (two kernel heads of r/2), got {cfg.rank}")
        s = float(cfg.get("sparsity", 0.5))
        if not 0.0 <= s < 1.0:
            raise ValueError(f"snell: sparsity must be in [0, 1), got {s}")

    def init_layer(self, W: Tensor, cfg: MethodConfig, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        self.check_shape(tuple(W.shape), cfg)
        m, n, h = W.shape[0], W[0].numel(), cfg.rank // 2
        # the reference inits the heads stacked, (2, n, r/2) and (2, m, r/2): kaiming's fan_in is n·r/2 and m·r/2
        return {
            "a1": kaiming_uniform((n, h), generator, W.device, fan_in=n * h),  # (n_flat, r/2)
            "a2": kaiming_uniform((n, h), generator, W.device, fan_in=n * h),
            "b1": kaiming_uniform((m, h), generator, W.device, fan_in=m * h),  # (m, r/2)
            "b2": kaiming_uniform((m, h), generator, W.device, fan_in=m * h),
        }

    def delta(self, W: Tensor, p: dict[str, Tensor], cfg: MethodConfig) -> Tensor:
        dW = sparsify(kernel_delta(p), float(cfg.get("sparsity", 0.5)))  # (m, n_flat)
        return like(dW, W)

    def num_trainable(self, shape: tuple[int, ...], cfg: MethodConfig) -> int:
        m, n = shape[0], int(torch.Size(shape[1:]).numel())
        return cfg.rank * (m + n)
