"""Any method → rank-r LoRA by truncated SVD of ΔW, and LoRA canonicalisation (gauge fixing).

* :func:`to_lora` — ΔW of every layer (computed against the base weights for multiplicative methods) is
  factorised as ΔW ≈ B A with B = U_r √S_r, A = √S_r V_rᵀ (scale 1, alpha = rank); the per-layer relative error
  ‖ΔW − BA‖_F / ‖ΔW‖_F is reported. LoRA input is re-ranked exactly from its canonical factors (no dense ΔW).
* :func:`canonicalize_lora` — BA = (BR)(R⁻¹A) for any invertible R; fixing B = U√S, A = √S Vᵀ (SVD of BA,
  via two thin QRs, signs fixed so each column of U has a positive largest entry) leaves ΔW unchanged.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from .adapter import Adapter, layer_key
from .spec import AdapterSpec

BaseWeights = nn.Module | Mapping[str, Tensor] | None  # a model, or {layer name (or "<name>.weight"): weight}


@dataclass
class ConversionReport:
    """Per-layer relative Frobenius error of a rank-r LoRA conversion."""

    rank: int  # target rank
    errors: dict[str, float] = field(default_factory=dict)  # layer -> ‖ΔW − BA‖ / ‖ΔW‖ (0 when ΔW = 0)
    bias_dropped: list[str] = field(default_factory=list)  # layers whose bias delta a LoRA cannot carry
    exact: bool = False  # True when no conversion was needed (LoRA of that rank, or DoRA written natively)

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    @property
    def mean_error(self) -> float:
        return statistics.fmean(self.errors.values()) if self.errors else 0.0

    def summary(self) -> str:
        if self.exact:
            return f"exact (no SVD needed), rank {self.rank}"
        worst = max(self.errors, key=self.errors.get) if self.errors else "-"
        s = (
            f"rank {self.rank} SVD over {len(self.errors)} layers: relative error mean {self.mean_error:.3g}, "
            f"median {statistics.median(self.errors.values()) if self.errors else 0:.3g}, "
            f"max {self.max_error:.3g} ({worst})"
        )
        if self.bias_dropped:
            s += f"; bias deltas dropped in {len(self.bias_dropped)} layers"
        return s


def base_weight(base: BaseWeights, name: str, shape: tuple[int, ...]) -> Tensor | None:
    """The base weight of layer ``name`` from a model or mapping (None if not available)."""
    if base is None:
        return None
    if isinstance(base, nn.Module):
        mod = base.get_submodule(name)
        w = mod.weight
    else:
        w = base.get(name, base.get(name + ".weight"))
        if w is None:
            raise ValueError(f"base weights have no entry for layer {name!r}")
    if tuple(w.shape) != tuple(shape):
        raise ValueError(f"base weight of {name!r} has shape {tuple(w.shape)}, adapter expects {tuple(shape)}")
    return w.detach()


def needs_base(method) -> bool:
    """True if ΔW depends on the base weight W (multiplicative methods, and DoRA through its row norm)."""
    return bool(method.multiplicative) or method.name == "dora"


def layer_deltas(adapter: Adapter, base: BaseWeights = None):
    """Yield ``(layer, ΔW fp32 (m, n_flat), Δb or None)`` for every layer (scale 1)."""
    from .methods import get_method, method_config

    spec = adapter.spec
    method = get_method(spec.method)
    cfg = method_config(spec)
    for lay in spec.layers:
        W = base_weight(base, lay.name, lay.shape)
        if W is None:
            if needs_base(method):
                raise ValueError(
                    f"method {spec.method!r}: ΔW depends on the base weights; converting it needs them (base=...)"
                )
            W = torch.zeros(lay.shape)  # additive method: ΔW does not depend on W
        W = W.float()
        p = adapter.layer_params(lay.name)
        key = method.shared_key(lay.shape, cfg)
        if key is not None:
            p = {**p, **adapter.shared_params(key)}
        p = {k: v.to(W.device) for k, v in p.items()}
        dW = method.delta(W, p, cfg).float().reshape(lay.shape[0], -1)  # (m, n_flat)
        db = method.bias_delta(W, p, cfg) if method.has_bias_delta else None
        yield lay, dW, db


def lora_svd(dW: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """Best rank-r factors of ΔW (m, n): B (m, r) = U√S, A (r, n) = √S Vᵀ, and the relative error."""
    U, S, Vh = torch.linalg.svd(dW.double(), full_matrices=False)  # (m, k), (k,), (k, n)
    return _split(U, S, Vh, rank) + (_rel_err(S, rank),)


def _rel_err(S: Tensor, rank: int) -> float:
    total = float((S**2).sum())
    return 0.0 if total == 0 else math.sqrt(float((S[rank:] ** 2).sum()) / total)


def _split(U: Tensor, S: Tensor, Vh: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    k = min(rank, S.numel())
    U, S, Vh = _fix_signs(U[:, :k], S[:k], Vh[:k])
    sq = S.clamp_min(0).sqrt()
    B = U * sq  # (m, k)
    A = sq[:, None] * Vh  # (k, n)
    if k < rank:  # pad with zero components
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - k)], 1)
        A = torch.cat([A, A.new_zeros(rank - k, A.shape[1])], 0)
    return B.float(), A.float()


def _fix_signs(U: Tensor, S: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Flip (u_k, v_k) pairs so the largest-magnitude entry of each u_k is positive (deterministic gauge)."""
    idx = U.abs().argmax(0)  # (k,)
    sign = torch.sign(U.gather(0, idx[None])[0])  # (k,)
    sign[sign == 0] = 1
    return U * sign, S, Vh * sign[:, None]


def lora_factors_svd(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of B A (m, r)(r, n) without forming it: U (m, r), S (r,), Vh (r, n) in fp64."""
    Qb, Rb = torch.linalg.qr(B.double())  # (m, r), (r, r)
    Qa, Ra = torch.linalg.qr(A.double().T)  # (n, r), (r, r)
    u, S, vh = torch.linalg.svd(Rb @ Ra.T)  # (r, r) core
    return Qb @ u, S, vh @ Qa.T  # (m, r), (r,), (r, n)


def canonicalize_lora(adapter: Adapter) -> Adapter:
    """Gauge-fix every layer's (A, B): B = U√S, A = √S Vᵀ from the SVD of BA. ΔW = s·BA is unchanged.

    Works for any method whose params include LoRA factors ``A`` (r, n_flat) and ``B`` (m, r) (LoRA, DoRA).
    """
    out = dict(adapter.tensors)
    r = adapter.spec.rank
    for lay in adapter.spec.layers:
        ka, kb = layer_key(lay.name, "A"), layer_key(lay.name, "B")
        if ka not in out or kb not in out:
            raise ValueError(f"layer {lay.name!r} has no LoRA factors A/B to canonicalise")
        A, B = out[ka], out[kb]
        U, S, Vh = lora_factors_svd(B, A)
        B2, A2 = _split(U, S, Vh, r)
        out[ka], out[kb] = A2.to(A.dtype), B2.to(B.dtype)
    return Adapter(adapter.spec, out)


def to_lora(adapter: Adapter, rank: int | None = None, base: BaseWeights = None) -> tuple[Adapter, ConversionReport]:
    """Convert any adapter to a plain LoRA of rank ``rank`` (default: the adapter's rank), scale 1 (alpha = rank)."""
    spec = adapter.spec
    r = spec.rank if rank is None else int(rank)
    if r < 1:
        raise ValueError(f"rank must be >= 1, got {r}")
    cap = max((min(lay.d_out, math.prod(lay.shape[1:])) for lay in spec.layers), default=r)
    if r > cap and r > spec.rank:
        raise ValueError(
            f"rank {r} is above the largest rank any layer of this adapter can hold ({cap}); a higher rank would only "
            "add zero padding"
        )
    report = ConversionReport(rank=r)
    tensors: dict[str, Tensor] = {}
    if spec.method == "lora":
        if r == spec.rank:
            report.exact = True
            report.errors = {lay.name: 0.0 for lay in spec.layers}
            return adapter, report
        s = spec.scale
        for lay in spec.layers:
            p = adapter.layer_params(lay.name)
            U, S, Vh = lora_factors_svd(p["B"].float() * s, p["A"].float())
            B, A = _split(U, S, Vh, r)
            report.errors[lay.name] = _rel_err(S, r)
            tensors[layer_key(lay.name, "A")], tensors[layer_key(lay.name, "B")] = A, B
    else:
        for lay, dW, db in layer_deltas(adapter, base):
            B, A, err = lora_svd(dW, r)
            report.errors[lay.name] = err
            tensors[layer_key(lay.name, "A")], tensors[layer_key(lay.name, "B")] = A, B
            if db is not None and bool((db != 0).any()):
                report.bias_dropped.append(lay.name)
    new_spec = replace(spec, method="lora", rank=r, alpha=None, params={})
    return Adapter(AdapterSpec.from_dict(new_spec.to_dict()), tensors), report


__all__ = [
    "BaseWeights",
    "ConversionReport",
    "base_weight",
    "canonicalize_lora",
    "layer_deltas",
    "lora_factors_svd",
    "lora_svd",
    "needs_base",
    "to_lora",
]
