"""TLoRA, transform + residual (arXiv 2501.08727): W' = W T + Δ (docs/weights.md §1.5).

T (n×n) in tensor-ring-matrix format: T[(i_1..i_D), (j_1..j_D)] = tr(Π_d T_d[i_d, j_d]), cores T_d (n_d, n_d, R, R).
Δ (m×n_flat) in tensor-ring format: Δ[(i..), (j..)] = tr(Π_d P_d[i_d] · Π_e Q_e[j_e]), P_d (m_d, R, R),
Q_e (n_e, R, R). Indices fold little-endian (i = i_1 + n_1 i_2 + n_1 n_2 i_3 + ...). R = cfg.rank.

Params per layer, all trainable: ``T0..`` (transform cores), ``P0..`` (output-side residual cores), ``Q0..``
(input-side residual cores), D = 3 each. Widths are factorised into 3 factors, >= 2 where possible and
most balanced first (320 = 5·8·8 where the paper lists 4·8·10: fewer core values; 768 = 8·8·12); widths that do
not split (primes) are padded with 1-wide cores, i.e. fall back to D = 1 (one dense core).
Init: T_d[:, :, ρ, ρ'] = I/R ⇒ T = I; P0 = 0, other residual cores N(0, σ²), σ = sqrt(R) / (fan_in) with
fan_in = width_d·R (μP-style) ⇒ Δ = 0, ΔW = 0.

Conv2d (m, c, kh, kw): T acts on the c input channels (shared over kernel positions, n = c), Δ uses the
(m, c*kh*kw) matrix view — a dense (c·kh·kw)² transform would be too large for 3×3 convs.
"""

from __future__ import annotations

from functools import lru_cache
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import AdapterMethod, LayerOp, MethodConfig, like, randn

NUM_FACTORS = 3  # D: every width folds into 3 factors (padded with 1s), so the param names are fixed


@lru_cache(maxsize=512)
def _factorizations(n: int, d: int, lo: int) -> tuple[tuple[int, ...], ...]:
    """All non-decreasing tuples of d factors >= lo whose product is n."""
    if d == 1:
        return ((n,),) if n >= lo else ()
    out = []
    f = lo
    while f**d <= n:
        if n % f == 0:
            out.extend((f, *rest) for rest in _factorizations(n // f, d - 1, f))
        f += 1
    return tuple(out)


def factorize(n: int, num_factors: int = NUM_FACTORS) -> tuple[int, ...]:
    """Factorise a width into exactly ``num_factors`` factors, non-decreasing.

    Prefers factors >= 2 and, among those, the smallest Σ f² (core size): 320 -> (5, 8, 8), 768 -> (8, 8, 12).
    Widths that do not split pad with 1s (a 1-wide core is a constant R×R matrix): 7 -> (1, 1, 7), i.e. D = 1.
    """
    if n < 1 or num_factors < 1:
        raise ValueError(f"cannot factorise width {n} into {num_factors} factors")
    cands = _factorizations(n, num_factors, 1)
    return min(cands, key=lambda fs: (fs.count(1), sum(f * f for f in fs), fs))


def ring_chain(cores: list[Tensor]) -> Tensor:
    """Cores (w_d, R, R) -> (Π w_d, R, R) products Π_d C_d[i_d], index little-endian."""
    M = cores[0]
    for C in cores[1:]:
        M = torch.einsum("xab,ybc->yxac", M, C).reshape(-1, *M.shape[1:])  # (w_prev * w_d, R, R)
    return M


def trm_matrix(cores: list[Tensor]) -> Tensor:
    """TRM cores (n_d, n_d, R, R) -> dense T (n, n), T[i, j] = tr(Π_d A_d[i_d, j_d])."""
    M = cores[0]  # (N, N, R, R) over the factors folded so far
    for C in cores[1:-1]:
        N, R = M.shape[0] * C.shape[0], M.shape[-1]
        M = torch.einsum("xuab,yvbc->yxvuac", M, C).reshape(N, N, R, R)
    if len(cores) == 1:
        return torch.einsum("ijaa->ij", M)
    C = cores[-1]  # close the ring with the last core without forming (n, n, R, R)
    n = M.shape[0] * C.shape[0]
    return torch.einsum("xuac,yvca->yxvu", M, C).reshape(n, n)


def tr_matrix(out_cores: list[Tensor], in_cores: list[Tensor]) -> Tensor:
    """TR residual: Δ[i, j] = tr(Π_d P_d[i_d] · Π_e Q_e[j_e]) -> (m, n_flat)."""
    return torch.einsum("iab,jba->ij", ring_chain(out_cores), ring_chain(in_cores))


class TLoRA(AdapterMethod):
    name: ClassVar[str] = "tlora"
    trainable: ClassVar[tuple[str, ...]] = tuple(f"{k}{d}" for k in "TPQ" for d in range(NUM_FACTORS))
    supports_conv: ClassVar[bool] = True
    multiplicative: ClassVar[bool] = True

    def factors(self, shape: tuple[int, ...], cfg: MethodConfig) -> tuple[tuple[int, ...], ...]:
        """(transform factors of n, residual factors of m, residual factors of n_flat)."""
        n_flat = int(torch.Size(shape[1:]).numel())
        return factorize(shape[1]), factorize(shape[0]), factorize(n_flat)

    def init_layer(self, W: Tensor, cfg: MethodConfig, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        self.check_shape(tuple(W.shape), cfg)
        R, dev = cfg.rank, W.device
        ft, fm, fn = self.factors(tuple(W.shape), cfg)
        p: dict[str, Tensor] = {}
        for d, nd in enumerate(ft):  # T_d[:, :, ρ, ρ'] = I / R  =>  T = I
            eye = torch.eye(nd, device=dev)[:, :, None, None] / R
            p[f"T{d}"] = eye.expand(nd, nd, R, R).contiguous()  # (n_d, n_d, R, R)
        for prefix, fs in (("P", fm), ("Q", fn)):
            for d, w in enumerate(fs):
                std = R**0.5 / (w * R)
                p[f"{prefix}{d}"] = randn((w, R, R), generator, dev) * std  # (w_d, R, R)
        p["P0"] = torch.zeros_like(p["P0"])  # Δ = 0
        return p

    def _cores(self, p: dict[str, Tensor], prefix: str) -> list[Tensor]:
        return [p[f"{prefix}{d}"].float() for d in range(NUM_FACTORS)]

    def delta(self, W: Tensor, p: dict[str, Tensor], cfg: MethodConfig) -> Tensor:
        T = trm_matrix(self._cores(p, "T"))  # (n, n)
        Tm = T - torch.eye(T.shape[0], device=T.device)  # W T − W = W (T − I)
        Wf = W.detach().float()
        if W.dim() == 2:
            WT = Wf @ Tm  # (m, n)
        else:  # transform on input channels: (m, c, kh, kw) x (c, c') -> (m, c', kh, kw)
            WT = torch.einsum("ochw,cd->odhw", Wf, Tm)
        dW = WT.reshape(W.shape[0], -1) + tr_matrix(self._cores(p, "P"), self._cores(p, "Q"))  # (m, n_flat)
        return like(dW, W)

    def forward(
        self, x: Tensor, W: Tensor, b: Tensor | None, p: dict[str, Tensor], cfg: MethodConfig, op: LayerOp
    ) -> Tensor:
        # y = W (T x) + Δ x + b: never forms W T (an m·n² product; 33 GFLOP for a 1280×5120 layer)
        T = trm_matrix(self._cores(p, "T")).to(x.dtype)  # (n, n)
        delta = tr_matrix(self._cores(p, "P"), self._cores(p, "Q")).to(x.dtype)  # (m, n_flat)
        if W.dim() == 2:
            return op(x @ T.T, W, b) + F.linear(x, delta)  # (..., m)
        xt = torch.einsum("cd,bdhw->bchw", T, x)  # channel transform per pixel (T·0 = 0: padding commutes)
        return op(xt, W, b) + op(x, delta.reshape(W.shape), None)  # (B, m, H', W')

    def num_trainable(self, shape: tuple[int, ...], cfg: MethodConfig) -> int:
        ft, fm, fn = self.factors(tuple(shape), cfg)
        return cfg.rank**2 * (sum(f * f for f in ft) + sum(fm) + sum(fn))

    def identity_reg(self, p: dict[str, Tensor], cfg: MethodConfig) -> Tensor:
        """Paper's identity regulariser Σ_d Σ_{ρ,ρ'} ‖T_d[:, :, ρ, ρ'] − I/R‖_F (0 at init)."""
        terms = []
        for C in self._cores(p, "T"):  # (n_d, n_d, R, R)
            eye = torch.eye(C.shape[0], device=C.device)[:, :, None, None] / cfg.rank
            terms.append(torch.linalg.vector_norm(C - eye, dim=(0, 1)).sum())
        return torch.stack(terms).sum()
