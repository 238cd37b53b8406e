"""LoLDU (arXiv 2410.13618, SKDDJ/LoLDU): W' = W_res + c·P L_r diag(z) Ū_r (docs/weights.md §1.4).

Partial-pivoting LU of the fp32 weight, W = P L diag(D) Ū (L unit lower (m, k), Ū unit upper (k, n_flat),
k = min(m, n_flat)); keep the FIRST r pivot steps (as the reference code): L_r = L[:, :r], Ū_r = Ū[:r],
z0 = D[:r]. W_res = W − c·P L_r diag(z0) Ū_r, hence ΔW = c·P L_r diag(z − z0) Ū_r.

Params per layer: ``z`` (r,) trainable (init z0, the reference ``lu`` init); frozen ``L`` (m, r), ``U`` (r, n_flat)
(= Ū_r), ``z0`` (r,) and ``perm`` (m,) int64 row indices with (P X)[i] = X[perm[i]] — fixes the reference
code's dense m×m fp32 P. c = cfg.scale (alpha / r; fixed, not trained): with alpha unset c = 1, as alpha = r in
every method here, where the reference's ``from_linear`` has alpha = 1, c = 1/r (set alpha 1 for that); c scales
how far a step on z moves ΔW, so the two differ in effective learning rate only. Conv2d: LU of the matrix view
(fixes the reference's LU on the 4-D weight). Pivots |D_i| < 1e-12 keep Ū_i = U_i (no blow-up).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .base import AdapterMethod, LayerOp, MethodConfig, as_matrix, like, lowrank_forward


class LoLDU(AdapterMethod):
    name: ClassVar[str] = "loldu"
    trainable: ClassVar[tuple[str, ...]] = ("z",)
    frozen: ClassVar[tuple[str, ...]] = ("z0", "L", "U", "perm")
    supports_conv: ClassVar[bool] = True
    rank_le_min_dim: ClassVar[bool] = True

    def init_layer(self, W: Tensor, cfg: MethodConfig, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        self.check_shape(tuple(W.shape), cfg)
        r = cfg.rank
        P, L, U = torch.linalg.lu(as_matrix(W))  # (m, m), (m, k), (k, n_flat); W = P L U
        perm = P.argmax(dim=1)  # (m,) int64: P[i, perm[i]] = 1
        D = torch.diagonal(U)[:r]  # (r,) first r pivots
        D_safe = torch.where(D.abs() < 1e-12, torch.ones_like(D), D)
        return {
            "z": D.clone(),  # (r,) trainable
            "z0": D.clone(),  # (r,) frozen
            "L": L[:, :r].contiguous(),  # (m, r) unit lower, unpermuted
            "U": (U[:r] / D_safe[:, None]).contiguous(),  # (r, n_flat) unit upper Ū_r
            "perm": perm,  # (m,) int64
        }

    def _up(self, p: dict[str, Tensor], cfg: MethodConfig) -> Tensor:
        """c·P L_r (m, r) via row gather."""
        return cfg.scale * p["L"].float()[p["perm"]]

    def delta(self, W: Tensor, p: dict[str, Tensor], cfg: MethodConfig) -> Tensor:
        dz = p["z"].float() - p["z0"].float()  # (r,)
        dW = (self._up(p, cfg) * dz) @ p["U"].float()  # (m, r) @ (r, n_flat)
        return like(dW, W)

    def num_trainable(self, shape: tuple[int, ...], cfg: MethodConfig) -> int:
        return cfg.rank

    def forward(
        self, x: Tensor, W: Tensor, b: Tensor | None, p: dict[str, Tensor], cfg: MethodConfig, op: LayerOp
    ) -> Tensor:
        down = (p["z"] - p["z0"])[:, None] * p["U"]  # (r, n_flat)
        return lowrank_forward(x, W, b, down, self._up(p, cfg), op)
