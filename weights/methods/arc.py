"""ARC, Adapter Re-Composing (NeurIPS 2023): x ↦ (I + D diag(c) Dᵀ) x + b before the layer (docs/weights.md §1.6).

Merged: W' = W (I + D diag(c) Dᵀ), bias' = bias + W b, so ΔW = W D diag(c) Dᵀ (multiplicative) and Δbias = W b.
Shared params: one down-projection ``D`` (n, r) per input width n (a UNet has several widths), trainable,
xavier-uniform; group key ``"d<n>"``. Per layer: ``c`` (r,), ``b`` (n,), zero init ⇒ ΔW = 0, Δbias = 0.
Unlike the paper, ``c`` and ``b`` belong to each adapted layer, not to each site: where q, k and v (which read one
normalised input) are all targeted, the paper ties their ``c`` and ``b``, and here each trains its own (a superset:
r + n more values per extra layer). One ``D`` per width also serves the attention and MLP sites of equal width.
Conv2d: 1x1 only (the input-side bias is not equivalent to a bias shift at zero-padded borders of k×k).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .base import AdapterMethod, LayerOp, MethodConfig, as_matrix, like


class ARC(AdapterMethod):
    name: ClassVar[str] = "arc"
    trainable: ClassVar[tuple[str, ...]] = ("c", "b")
    supports_conv: ClassVar[bool] = True
    conv_1x1_only: ClassVar[bool] = True
    multiplicative: ClassVar[bool] = True
    has_bias_delta: ClassVar[bool] = True

    def shared_key(self, shape: tuple[int, ...], cfg: MethodConfig) -> str | None:
        return f"d{shape[1]}"

    def init_shared(self, shape: tuple[int, ...], cfg: MethodConfig, generator: torch.Generator | None = None):
        n, r = shape[1], cfg.rank
        if r > n:
            raise ValueError(f"arc: rank {r} exceeds the input width {n}")
        gdev = generator.device if generator is not None else None
        bound = (6.0 / (n + r)) ** 0.5  # xavier-uniform
        return {"D": (torch.rand((n, r), generator=generator, device=gdev) * 2 - 1) * bound}  # (n, r)

    def shared_trainable(self) -> tuple[str, ...]:
        return ("D",)

    def init_layer(self, W: Tensor, cfg: MethodConfig, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        self.check_shape(tuple(W.shape), cfg)
        return {"c": torch.zeros(cfg.rank, device=W.device), "b": torch.zeros(W.shape[1], device=W.device)}

    def delta(self, W: Tensor, p: dict[str, Tensor], cfg: MethodConfig) -> Tensor:
        D = p["D"].float()  # (n, r)
        dW = ((as_matrix(W) @ D) * p["c"].float()) @ D.T  # W D diag(c) Dᵀ, (m, n)
        return like(dW, W)

    def bias_delta(self, W: Tensor, p: dict[str, Tensor], cfg: MethodConfig) -> Tensor | None:
        return (as_matrix(W) @ p["b"].float()).to(W.dtype)  # W b, (m,)

    def num_trainable(self, shape: tuple[int, ...], cfg: MethodConfig) -> int:
        return cfg.rank + shape[1]

    def forward(
        self, x: Tensor, W: Tensor, b: Tensor | None, p: dict[str, Tensor], cfg: MethodConfig, op: LayerOp
    ) -> Tensor:
        D, c, bl = (p[k].to(x.dtype) for k in ("D", "c", "b"))
        if W.dim() == 2:
            return op(x + ((x @ D) * c) @ D.T + bl, W, b)  # activation-space adapter, (..., n)
        xc = x.movedim(1, -1)  # (B, H, W, n): 1x1 conv acts per pixel
        return op((xc + ((xc @ D) * c) @ D.T + bl).movedim(-1, 1), W, b)
