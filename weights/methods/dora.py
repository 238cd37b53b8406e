"""DoRA (Liu et al. 2024): W' = diag(μ / ν) (W + s·B A), ν = sg(‖W + s·B A‖_row) (docs/weights.md §1.2).

Params per layer: ``A`` (r, n_flat), ``B`` (m, r) as LoRA, plus ``magnitude`` μ (m,), all trainable.
The row norm ν runs over (n, kh, kw) for Conv2d and is detached (paper §4.3, as peft does): no gradient
flows through it. ΔW = W' − W is computed against the original W, so a merge that keeps the original
weight (weights.apply) never needs the unmerge division. Init: B = 0, μ = ‖W‖_row ⇒ ΔW = 0.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import AdapterMethod, LayerOp, MethodConfig, as_matrix, like
from .lora import init_lora_factors, lora_delta_matrix


def dora_scale(W: Tensor, p: dict[str, Tensor], cfg: MethodConfig) -> tuple[Tensor, Tensor]:
    """fp32 (μ/ν (m,), s·BA (m, n_flat)) with ν = ‖W + s·BA‖_row detached."""
    Wm = as_matrix(W)  # (m, n_flat)
    lora = lora_delta_matrix(p, cfg)  # (m, n_flat)
    nu = torch.linalg.vector_norm(Wm + lora, dim=1).detach()  # (m,) — stop-gradient, as peft
    return p["magnitude"].float() / nu, lora


class DoRA(AdapterMethod):
    name: ClassVar[str] = "dora"
    param_keys: ClassVar[tuple[str, ...]] = ("init",)
    trainable: ClassVar[tuple[str, ...]] = ("A", "B", "magnitude")
    supports_conv: ClassVar[bool] = True

    def init_layer(self, W: Tensor, cfg: MethodConfig, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        self.check_shape(tuple(W.shape), cfg)
        Wm = as_matrix(W)  # (m, n_flat)
        p = init_lora_factors(Wm.shape[0], Wm.shape[1], cfg, generator, W.device)
        p["magnitude"] = torch.linalg.vector_norm(Wm, dim=1)  # (m,) = ‖W + s·B A‖_row since B = 0
        return p

    def delta(self, W: Tensor, p: dict[str, Tensor], cfg: MethodConfig) -> Tensor:
        g, lora = dora_scale(W, p, cfg)  # (m,), (m, n_flat)
        Wm = as_matrix(W)
        dW = g[:, None] * (Wm + lora) - Wm  # W' − W, (m, n_flat)
        return like(dW, W)

    def num_trainable(self, shape: tuple[int, ...], cfg: MethodConfig) -> int:
        m, n_flat = shape[0], int(torch.Size(shape[1:]).numel())
        return cfg.rank * (m + n_flat) + m

    def forward(
        self, x: Tensor, W: Tensor, b: Tensor | None, p: dict[str, Tensor], cfg: MethodConfig, op: LayerOp
    ) -> Tensor:
        # peft's formulation: y = W x + b + (g − 1)⊙(W x) + g⊙(s·B A x), g = μ/ν; the bias is not rescaled.
        g, _ = dora_scale(W, p, cfg)
        shape = (-1,) + (1,) * (W.dim() - 2)  # channel dim broadcast: (m,) for Linear, (m, 1, 1) for Conv2d
        g = g.to(x.dtype).reshape(shape)
        base = op(x, W, None)  # (..., m) or (B, m, H', W')
        h = op(x, p["A"].to(x.dtype).reshape(-1, *W.shape[1:]), None)  # (..., r) or (B, r, H', W')
        up = cfg.scale * p["B"].to(x.dtype)  # (m, r)
        lo = F.linear(h, up) if W.dim() == 2 else F.conv2d(h, up[:, :, None, None])  # like base
        y = g * (base + lo)
        return y if b is None else y + b.reshape(shape)
