"""LoRA (Hu et al. 2021): ΔW = s · B A (docs/weights.md §1.1).

Params per layer: ``A`` (r, n_flat) trainable, ``B`` (m, r) trainable. Conv2d (m, n, kh, kw) uses the matrix
view n_flat = n*kh*kw, i.e. A is a (r, n, kh, kw) conv and B a 1x1 conv (the kohya layout).
Init (``params["init"]``): ``"kaiming"`` (peft default, A ~ kaiming-uniform(a=sqrt 5)) or ``"gaussian"``
(diffusers training scripts, A ~ N(0, 1/r^2)); B = 0, so ΔW = 0 at init.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .base import AdapterMethod, LayerOp, MethodConfig, kaiming_uniform, like, lowrank_forward, randn

LORA_INITS = ("kaiming", "gaussian")


def init_lora_factors(
    m: int, n_flat: int, cfg: MethodConfig, generator: torch.Generator | None, device=None
) -> dict[str, Tensor]:
    """A (r, n_flat) random, B (m, r) zero — shared by LoRA and DoRA."""
    r = cfg.rank
    init = cfg.get("init", "kaiming")
    if init == "kaiming":
        A = kaiming_uniform((r, n_flat), generator, device)
    elif init == "gaussian":
        A = randn((r, n_flat), generator, device) / r
    else:
        raise ValueError(f"unknown LoRA init {init!r}; valid: {', '.join(LORA_INITS)}")
    return {"A": A, "B": torch.zeros((m, r), device=device)}


class LoRA(AdapterMethod):
    name: ClassVar[str] = "lora"
    param_keys: ClassVar[tuple[str, ...]] = ("init",)
    trainable: ClassVar[tuple[str, ...]] = ("A", "B")
    supports_conv: ClassVar[bool] = True

    def init_layer(self, W: Tensor, cfg: MethodConfig, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        self.check_shape(tuple(W.shape), cfg)
        m, n_flat = W.shape[0], W[0].numel()
        return init_lora_factors(m, n_flat, cfg, generator, W.device)

    def delta(self, W: Tensor, p: dict[str, Tensor], cfg: MethodConfig) -> Tensor:
        dW = cfg.scale * (p["B"].float() @ p["A"].float())  # (m, r) @ (r, n_flat) -> (m, n_flat)
        return like(dW, W)

    def num_trainable(self, shape: tuple[int, ...], cfg: MethodConfig) -> int:
        m, n_flat = shape[0], int(torch.Size(shape[1:]).numel())
        return cfg.rank * (m + n_flat)

    def forward(
        self, x: Tensor, W: Tensor, b: Tensor | None, p: dict[str, Tensor], cfg: MethodConfig, op: LayerOp
    ) -> Tensor:
        # y = W x + b + s · B (A x), never materialising BA
        return lowrank_forward(x, W, b, p["A"], cfg.scale * p["B"], op)


def lora_delta_matrix(p: dict[str, Tensor], cfg: MethodConfig) -> Tensor:
    """fp32 s·BA as an (m, n_flat) matrix (used by DoRA)."""
    return cfg.scale * (p["B"].float() @ p["A"].float())


__all__ = ["LORA_INITS", "LoRA", "init_lora_factors", "lora_delta_matrix"]
