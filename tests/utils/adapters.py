"""Random (non-zero) adapters for a real model, built with the methods' own init functions."""

from __future__ import annotations

import torch
from torch import nn

from weights.adapter import Adapter, layer_key
from weights.spec import AdapterSpec, LayerInfo, match_targets

ATTN = ["to_q", "to_k", "to_v", "to_out.0"]


def spec_for(
    model: nn.Module, method: str = "lora", rank: int = 4, targets=ATTN, alpha=None, params=None, base_model=""
):
    layers = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear | nn.Conv2d) and match_targets(name, list(targets)):
            kind = "conv" if isinstance(mod, nn.Conv2d) else "linear"
            layers.append(LayerInfo(name, tuple(mod.weight.shape), kind))
    return AdapterSpec(
        method=method,
        rank=rank,
        alpha=alpha,
        params=dict(params or {}),
        targets=list(targets),
        layers=layers,
        base_model=base_model,
    )


def make_adapter(
    model: nn.Module,
    method: str = "lora",
    rank: int = 4,
    targets=ATTN,
    seed: int = 0,
    noise: float = 0.3,
    alpha=None,
    params=None,
) -> Adapter:
    """Init every targeted layer with the method's init, then add ``noise``·N(0, rms²) to each trainable tensor."""
    from weights.methods import get_method, method_config

    spec = spec_for(model, method, rank, targets, alpha, params)
    m = get_method(method)
    cfg = method_config(spec)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    shared_done = set()
    for lay in spec.layers:
        W = model.get_submodule(lay.name).weight.detach().float()
        p = m.init_layer(W, cfg, g)
        key = m.shared_key(lay.shape, cfg)
        if key is not None and key not in shared_done:
            shared_done.add(key)
            for k, v in m.init_shared(lay.shape, cfg, g).items():
                if k in m.shared_trainable():
                    v = v + noise * torch.randn(v.shape, generator=g) * (v.pow(2).mean().sqrt() + 0.1)
                tensors[f"shared::{key}::{k}"] = v
        for k, v in p.items():
            if k in m.trainable:
                rms = float(v.pow(2).mean().sqrt()) if v.numel() else 0.0
                v = v + noise * torch.randn(v.shape, generator=g) * (rms if rms > 0 else 0.3)
            tensors[layer_key(lay.name, k)] = v.contiguous()
    return Adapter(spec, tensors)
