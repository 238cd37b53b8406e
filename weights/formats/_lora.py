"""Shared LoRA plumbing of the standard formats: export factors in file layout, and rebuild an Adapter on read."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..adapter import Adapter, layer_key
from ..convert import BaseWeights, ConversionReport, to_lora
from ..errors import AdapterFileError
from ..spec import AdapterSpec, LayerInfo
from . import keeps_dora


@dataclass
class LoraLayer:
    info: LayerInfo
    down: Tensor  # A in file layout: (r, n) Linear, (r, n, kh, kw) Conv2d
    up: Tensor  # B in file layout: (m, r) Linear, (m, r, 1, 1) Conv2d
    magnitude: Tensor | None = None  # DoRA μ: (m,) Linear, (1, m, 1, 1) Conv2d (peft layout)


@dataclass
class LoraExport:
    rank: int
    alpha: float
    layers: list[LoraLayer]
    report: ConversionReport
    dora: bool = False


def export_lora(
    adapter: Adapter,
    rank: int | None = None,
    base: BaseWeights = None,
    fmt: str = "diffusers",
    bake_scale: bool = True,
) -> LoraExport:
    """LoRA factors (file layout) for any adapter: LoRA as is, DoRA natively where ``fmt`` keeps it, others via
    SVD."""
    spec = adapter.spec
    dora = keeps_dora(spec, fmt, rank)
    if dora:
        lora, report = adapter, ConversionReport(rank=spec.rank, exact=True)
    else:
        lora, report = to_lora(adapter, rank, base)
    s = lora.spec
    alpha = float(s.alpha if s.alpha is not None else s.rank)
    if bake_scale and s.scale != 1.0:
        alpha = float(s.rank)
    layers = []
    for lay in s.layers:
        p = lora.layer_params(lay.name)
        A, B = p["A"], p["B"]  # (r, n_flat), (m, r)
        if bake_scale and s.scale != 1.0:
            B = B.float() * s.scale
        conv = len(lay.shape) == 4
        down = A.reshape(A.shape[0], *lay.shape[1:]) if conv else A
        up = B.reshape(*B.shape, 1, 1) if conv else B
        mag = None
        if dora:
            mag = p["magnitude"].reshape(1, -1, 1, 1) if conv else p["magnitude"]
        layers.append(LoraLayer(lay, down.contiguous(), up.contiguous(), None if mag is None else mag.contiguous()))
    return LoraExport(s.rank, alpha, layers, report, dora)


@dataclass
class _Acc:
    down: Tensor | None = None
    up: Tensor | None = None
    magnitude: Tensor | None = None
    alpha: float | None = None
    keys: list[str] = field(default_factory=list)


def pattern_value(name: str, patterns: dict, default):
    """peft's rank_pattern/alpha_pattern lookup: the first key matching the end of the module path."""
    for pat, val in patterns.items():
        if re.match(rf"(.*\.)?({pat})$", name):
            return val
    return default


def build_lora_adapter(
    entries: dict[str, dict[str, Tensor]],
    *,
    alphas: dict[str, float] | None = None,
    default_alpha: float | None = None,
    alpha_pattern: dict | None = None,
    base_model: str = "",
    component: str = "unet",
    path: str | None = None,
) -> Adapter:
    """An Adapter (method lora or dora) from ``{module path: {"down", "up", ["magnitude"]}}`` in file layout.

    Per-layer scale alpha_l / r_l follows peft: explicit per-layer alpha, else ``alpha_pattern``, else
    ``default_alpha``, else the majority rank; a file with no alpha at all has alpha_l = r_l (scale 1 everywhere,
    as diffusers loads it). Ranks are padded with zeros to the largest; if scales differ
    between layers they are baked into B and the spec gets alpha = rank.
    """
    if not entries:
        raise AdapterFileError("no LoRA tensors found", "keys", path)
    alphas = alphas or {}
    ranks = {name: _checked_rank(name, e, path) for name, e in entries.items()}
    dora = all("magnitude" in e for e in entries.values())
    if not dora and any("magnitude" in e for e in entries.values()):
        raise AdapterFileError("DoRA magnitude vectors present for some layers only", "keys", path)
    scales = _layer_scales(ranks, alphas, default_alpha, alpha_pattern)
    R = max(ranks.values())
    uniform = len(set(scales.values())) == 1 and len(set(ranks.values())) == 1
    tensors: dict[str, Tensor] = {}
    layers = []
    for name in sorted(entries):
        e = entries[name]
        down, up = e["down"], e["up"]
        m, r = up.shape[0], up.shape[1]
        conv = down.dim() == 4
        shape = (m, *down.shape[1:]) if conv else (m, down.shape[1])
        A = down.reshape(r, -1)  # (r, n_flat)
        B = up.reshape(m, r)  # (m, r)
        if not uniform:
            B = B.float() * scales[name]
        if r < R:
            A = torch.cat([A, A.new_zeros(R - r, A.shape[1])], 0)
            B = torch.cat([B, B.new_zeros(m, R - r)], 1)
        layers.append(LayerInfo(name, tuple(int(x) for x in shape), "conv" if conv else "linear"))
        tensors[layer_key(name, "A")], tensors[layer_key(name, "B")] = A.contiguous(), B.contiguous()
        if dora:
            tensors[layer_key(name, "magnitude")] = e["magnitude"].reshape(m).contiguous()
    first = next(iter(scales.values()))
    alpha = first * R if uniform else None
    targets = sorted({_target_of(name) for name in entries})
    spec = AdapterSpec(
        method="dora" if dora else "lora",
        rank=R,
        alpha=None if alpha is None or alpha == R else alpha,
        targets=targets,
        layers=layers,
        base_model=base_model,
        component=component,
    )
    return Adapter(spec, tensors)


def _checked_rank(name: str, e: dict[str, Tensor], path: str | None) -> int:
    """The rank of one layer's factors in file layout, after checking their shapes (and the magnitude's)."""
    if "down" not in e or "up" not in e:
        missing = "down/lora_A" if "down" not in e else "up/lora_B"
        raise AdapterFileError(f"layer {name!r} has no {missing} tensor", "keys", path)
    down, up = e["down"], e["up"]
    if down.dim() not in (2, 4) or up.dim() != down.dim() or (up.dim() == 4 and tuple(up.shape[2:]) != (1, 1)):
        raise AdapterFileError(
            f"layer {name!r}: down {tuple(down.shape)} / up {tuple(up.shape)} are not LoRA factor shapes",
            "shape",
            path,
        )
    mag = e.get("magnitude")
    if mag is not None and mag.numel() != up.shape[0]:
        raise AdapterFileError(
            f"layer {name!r}: magnitude has {mag.numel()} values, expected {up.shape[0]}", "shape", path
        )
    if up.shape[1] != down.shape[0]:
        raise AdapterFileError(
            f"layer {name!r}: down {tuple(down.shape)} and up {tuple(up.shape)} ranks differ", "shape", path
        )
    return down.shape[0]


def _layer_scales(
    ranks: dict[str, int], alphas: dict[str, float], default_alpha: float | None, alpha_pattern: dict | None
) -> dict[str, float]:
    """alpha_l / r_l per layer, resolved as peft does (see :func:`build_lora_adapter`)."""
    major = Counter(ranks.values()).most_common(1)[0][0]
    g_alpha = float(default_alpha) if default_alpha is not None else float(major)
    no_alpha = default_alpha is None and not alphas and not alpha_pattern
    scales = {}
    for name, r in ranks.items():
        a = alphas.get(name)
        if a is None:
            a = float(r) if no_alpha else float(pattern_value(name, alpha_pattern or {}, g_alpha))
        scales[name] = a / r
    return scales


def _target_of(name: str) -> str:
    """Module pattern of a path: its last component, or the last two for ``to_out.0`` / ``net.0.proj``-style."""
    parts = name.split(".")
    if parts[-1].isdigit() and len(parts) > 1:
        return ".".join(parts[-2:])
    return parts[-1]


def floats_only(sd: dict[str, Tensor], path: str | None) -> None:
    for k, v in sd.items():
        if not v.is_floating_point():
            raise AdapterFileError(f"tensor {k!r} has dtype {v.dtype}, expected a floating-point dtype", "dtype", path)


__all__ = ["LoraExport", "LoraLayer", "build_lora_adapter", "export_lora", "floats_only", "pattern_value"]
