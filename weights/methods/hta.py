"""HTA (arXiv 2410.22952): ΔW = H_l diag(d) H_r + w_u w_dᵀ, H = I − v vᵀ (docs/weights.md §1.7).

Params per layer, all trainable: ``v_l`` (m,), ``v_r`` (n_flat,), ``d`` (k,) with k = min(m, n_flat) on the
diagonal of a rectangular (m, n_flat) matrix, and the rank-1 pair ``w_u`` (m,), ``w_d`` (n_flat,).
As in the paper, H is not normalised (a reflection only when ‖v‖² = 2); v_l, v_r start as random vectors
of norm sqrt(2) (exact reflections), d = 0 and w_u = 0 (w_d kaiming-uniform) ⇒ ΔW = 0 at init.
H is applied as x − v (vᵀ x), never materialised. Conv2d: matrix view (merged-weight forward).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import AdapterMethod, LayerOp, MethodConfig, kaiming_uniform, like, randn


def _householder_rows(X: Tensor, v: Tensor) -> Tensor:
    """X (..., k) -> X H = X − (X v) vᵀ (H symmetric)."""
    return X - (X @ v)[..., None] * v


def _rect_diag(x: Tensor, d: Tensor, m: int) -> Tensor:
    """(..., n) -> (..., m): y_i = d_i x_i for i < k = min(m, n), zeros beyond."""
    k = d.shape[0]
    y = x[..., :k] * d  # (..., k)
    return F.pad(y, (0, m - k)) if m > k else y


class HTA(AdapterMethod):
    name: ClassVar[str] = "hta"
    trainable: ClassVar[tuple[str, ...]] = ("v_l", "v_r", "d", "w_u", "w_d")
    supports_conv: ClassVar[bool] = True

    def init_layer(self, W: Tensor, cfg: MethodConfig, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        self.check_shape(tuple(W.shape), cfg)
        m, n, dev = W.shape[0], W[0].numel(), W.device
        v_l = randn((m,), generator, dev)
        v_r = randn((n,), generator, dev)
        return {
            "v_l": v_l * (2**0.5 / v_l.norm()),  # (m,)
            "v_r": v_r * (2**0.5 / v_r.norm()),  # (n_flat,)
            "d": torch.zeros(min(m, n), device=dev),  # (k,)
            "w_u": torch.zeros(m, device=dev),  # (m,)
            "w_d": kaiming_uniform((1, n), generator, dev)[0],  # (n_flat,)
        }

    def delta(self, W: Tensor, p: dict[str, Tensor], cfg: MethodConfig) -> Tensor:
        m, n = W.shape[0], W[0].numel()
        v_l, v_r, d = p["v_l"].float(), p["v_r"].float(), p["d"].float()
        k = d.shape[0]
        Dm = torch.zeros(m, n, device=d.device)
        Dm[:k, :k] = torch.diag(d)  # (m, n_flat) rectangular diag
        X = Dm - v_l[:, None] * (v_l @ Dm)[None, :]  # H_l D
        X = _householder_rows(X, v_r)  # (H_l D) H_r, (m, n_flat)
        dW = X + torch.outer(p["w_u"].float(), p["w_d"].float())  # + w_u w_dᵀ
        return like(dW, W)

    def num_trainable(self, shape: tuple[int, ...], cfg: MethodConfig) -> int:
        m, n = shape[0], int(torch.Size(shape[1:]).numel())
        return m + n + min(m, n) + (m + n)

    def forward(
        self, x: Tensor, W: Tensor, b: Tensor | None, p: dict[str, Tensor], cfg: MethodConfig, op: LayerOp
    ) -> Tensor:
        if W.dim() != 2:
            return super().forward(x, W, b, p, cfg, op)
        p = {k: v.to(x.dtype) for k, v in p.items()}
        h = _householder_rows(x, p["v_r"])  # H_r x, (..., n)
        h = _rect_diag(h, p["d"], W.shape[0])  # D H_r x, (..., m)
        h = _householder_rows(h, p["v_l"])  # H_l D H_r x
        return op(x, W, b) + h + (x @ p["w_d"])[..., None] * p["w_u"]  # + w_u (w_dᵀ x)
