"""SVFit (arXiv 2409.05926): W' = W_e + U_r diag(σ) V_rᵀ with W = U Σ Vᵀ, W_e = W − U_r Σ_r V_rᵀ (docs/weights.md 1.3).

Params per layer: ``sigma`` (r,) trainable (init: the top-r singular values σ0); frozen ``U`` (m, r),
``Vh`` (r, n_flat) = V_rᵀ and ``sigma0`` (r,). Then ΔW = U_r diag(σ − σ0) V_rᵀ exactly (W_e cancels), so
applying needs no SVD. The SVD runs once, in fp32, at init (``params["svd"]``: ``"exact"`` full SVD, default, or
``"lowrank"`` randomized top-r SVD — ΔW = 0 at init either way). Conv2d: SVD of the (m, n*kh*kw) matrix view.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .base import AdapterMethod, LayerOp, MethodConfig, as_matrix, like, lowrank_forward


class SVFit(AdapterMethod):
    name: ClassVar[str] = "svfit"
    param_keys: ClassVar[tuple[str, ...]] = ("svd",)
    trainable: ClassVar[tuple[str, ...]] = ("sigma",)
    frozen: ClassVar[tuple[str, ...]] = ("sigma0", "U", "Vh")
    supports_conv: ClassVar[bool] = True
    rank_le_min_dim: ClassVar[bool] = True

    def init_layer(self, W: Tensor, cfg: MethodConfig, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        self.check_shape(tuple(W.shape), cfg)
        r = cfg.rank
        Wm = as_matrix(W)  # (m, n_flat)
        if cfg.get("svd", "exact") == "lowrank":  # randomized top-r SVD: much faster on large CPU layers
            cuda = [W.device.index or 0] if W.device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):  # leave the caller's RNG state untouched
                torch.manual_seed(0)  # deterministic basis for a given W
                U, S, V = torch.svd_lowrank(Wm, q=min(r + 8, *Wm.shape), niter=6)  # (m, q), (q,), (n_flat, q)
            Vh = V.T
        elif cfg.get("svd", "exact") == "exact":
            U, S, Vh = torch.linalg.svd(Wm, full_matrices=False)  # (m, k), (k,), (k, n_flat)
        else:
            raise ValueError(f"svfit: params['svd'] must be 'exact' or 'lowrank', got {cfg.get('svd')!r}")
        return {
            "sigma": S[:r].clone(),  # (r,) trainable
            "sigma0": S[:r].clone(),  # (r,) frozen
            "U": U[:, :r].contiguous(),  # (m, r) frozen
            "Vh": Vh[:r].contiguous(),  # (r, n_flat) frozen
        }

    def delta(self, W: Tensor, p: dict[str, Tensor], cfg: MethodConfig) -> Tensor:
        ds = p["sigma"].float() - p["sigma0"].float()  # (r,)
        dW = (p["U"].float() * ds) @ p["Vh"].float()  # (m, r) @ (r, n_flat)
        return like(dW, W)

    def num_trainable(self, shape: tuple[int, ...], cfg: MethodConfig) -> int:
        return cfg.rank

    def forward(
        self, x: Tensor, W: Tensor, b: Tensor | None, p: dict[str, Tensor], cfg: MethodConfig, op: LayerOp
    ) -> Tensor:
        down = (p["sigma"] - p["sigma0"])[:, None] * p["Vh"]  # (r, n_flat)
        return lowrank_forward(x, W, b, down, p["U"], op)
