"""Adapter ↔ ``(num_tokens, token_dim)`` tensor for the hypernetwork, and dataset-level token statistics.

Only the **trainable** tensors become tokens (frozen buffers such as SVFit's U/V are identical for every
identity of one base model and stay in a *template* adapter, see :func:`split_template`). Per layer (in spec
order) the trainable tensors (in ``method.trainable`` order) are flattened, concatenated and cut into tokens of
``token_dim`` values; the last token of a layer is zero-padded and ``mask`` marks the real values. Shared
trainable tensors (ARC) form extra groups after the layers. Every token carries its group (layer) id and its
position inside the group. Optionally (``TokenLayout.canonicalize``) LoRA/DoRA factors are canonicalised first
(B = U√S, A = √S Vᵀ), removing the gauge freedom BA = (BR)(R⁻¹A) for adapters of unrelated inits; adapters
trained from one seeded init share a gauge already and are better left raw (the hypernet datasets do).
``tokens_to_adapter(adapter_to_tokens(a))`` reproduces the (canonical) tensors exactly.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from .adapter import SEP, SHARED, Adapter, layer_key
from .spec import AdapterSpec

STAT_MODES = ("element", "token", "global")


@dataclass(frozen=True)
class TokenEntry:
    key: str  # adapter tensor key
    shape: tuple[int, ...]  # tensor shape
    group: int  # layer id (index into TokenLayout.groups)
    offset: int  # start of this tensor in the group's flat vector


@dataclass
class TokenLayout:
    """Where every trainable value of an adapter lives in the token tensor."""

    token_dim: int  # D, values per token
    groups: list[str]  # layer names, then "shared::<group>" entries
    group_tokens: list[int]  # tokens per group
    group_sizes: list[int]  # real values per group
    entries: list[TokenEntry]  # trainable tensors in token order
    spec_hash: str  # AdapterSpec.hash() of the adapters this layout was made for
    # canonicalise LoRA/DoRA factors before tokenising; off for datasets whose adapters share one seeded init
    # (every identity starts from the same A, so the raw factors already live in one gauge, and averaging or
    # regressing raw factors is near-linear in ΔW while per-identity SVD bases are not)
    canonicalize: bool = True

    @classmethod
    def from_adapter(cls, adapter: Adapter, token_dim: int, canonicalize: bool = True) -> TokenLayout:
        """The layout for adapters of this spec (tensor shapes are read from ``adapter``)."""
        from .methods import get_method

        if token_dim < 1:
            raise ValueError(f"token_dim must be >= 1, got {token_dim}")
        spec = adapter.spec
        method = get_method(spec.method)
        groups, entries, sizes = [], [], []
        for lay in spec.layers:
            _add_group(groups, entries, sizes, adapter, lay.name, [layer_key(lay.name, k) for k in method.trainable])
        shared_groups = sorted({k.split(SEP)[1] for k in adapter.tensors if k.startswith(SHARED + SEP)})
        for g in shared_groups:
            keys = [f"{SHARED}{SEP}{g}{SEP}{k}" for k in method.shared_trainable()]
            keys = [k for k in keys if k in adapter.tensors]
            if keys:
                _add_group(groups, entries, sizes, adapter, f"{SHARED}{SEP}{g}", keys)
        toks = [math.ceil(s / token_dim) for s in sizes]
        return cls(token_dim, groups, toks, sizes, entries, spec.hash(), canonicalize)

    @property
    def num_tokens(self) -> int:
        return sum(self.group_tokens)

    @property
    def layer_ids(self) -> Tensor:
        """(T,) group id of every token."""
        return torch.repeat_interleave(torch.arange(len(self.groups)), torch.tensor(self.group_tokens))

    @property
    def pos_ids(self) -> Tensor:
        """(T,) position of every token inside its group."""
        return (
            torch.cat([torch.arange(n) for n in self.group_tokens])
            if self.groups
            else torch.zeros(0, dtype=torch.long)
        )

    @property
    def mask(self) -> Tensor:
        """(T, D) bool, True where a token holds a real value (False = padding)."""
        D = self.token_dim
        rows = []
        for n, size in zip(self.group_tokens, self.group_sizes):
            m = torch.zeros(n * D, dtype=torch.bool)
            m[:size] = True
            rows.append(m.view(n, D))
        return torch.cat(rows) if rows else torch.zeros(0, D, dtype=torch.bool)

    def to_dict(self) -> dict:
        return {
            "token_dim": self.token_dim,
            "groups": self.groups,
            "group_tokens": self.group_tokens,
            "group_sizes": self.group_sizes,
            "entries": [[e.key, list(e.shape), e.group, e.offset] for e in self.entries],
            "spec_hash": self.spec_hash,
            "canonicalize": self.canonicalize,
        }

    @classmethod
    def from_dict(cls, d: dict) -> TokenLayout:
        entries = [TokenEntry(k, tuple(s), g, o) for k, s, g, o in d["entries"]]
        return cls(
            d["token_dim"],
            list(d["groups"]),
            list(d["group_tokens"]),
            list(d["group_sizes"]),
            entries,
            d["spec_hash"],
            bool(d.get("canonicalize", True)),
        )


def _add_group(groups, entries, sizes, adapter: Adapter, name: str, keys: list[str]) -> None:
    gid, off = len(groups), 0
    for k in keys:
        if k not in adapter.tensors:
            raise ValueError(f"adapter has no trainable tensor {k!r}")
        shape = tuple(adapter.tensors[k].shape)
        entries.append(TokenEntry(k, shape, gid, off))
        off += math.prod(shape)
    groups.append(name)
    sizes.append(off)


def _canonical(adapter: Adapter) -> Adapter:
    from .convert import canonicalize_lora
    from .methods import get_method

    if {"A", "B"} <= set(get_method(adapter.spec.method).trainable):
        return canonicalize_lora(adapter)
    return adapter


def adapter_to_tokens(adapter: Adapter, layout: TokenLayout, canonicalize: bool | None = None) -> Tensor:
    """(T, D) fp32 tokens of the adapter's trainable tensors (LoRA/DoRA canonicalised first when
    ``canonicalize``, default: the layout's choice)."""
    if adapter.spec.hash() != layout.spec_hash:
        raise ValueError("adapter spec does not match the token layout (different method, rank or layers)")
    if layout.canonicalize if canonicalize is None else canonicalize:
        adapter = _canonical(adapter)
    D = layout.token_dim
    flat_groups: list[list[Tensor]] = [[] for _ in layout.groups]
    for e in layout.entries:
        t = adapter.tensors[e.key]
        if tuple(t.shape) != e.shape:
            raise ValueError(f"tensor {e.key!r} has shape {tuple(t.shape)}, layout expects {e.shape}")
        flat_groups[e.group].append(t.detach().reshape(-1).float())
    out = []
    for parts, n in zip(flat_groups, layout.group_tokens):
        v = torch.cat(parts)
        out.append(torch.nn.functional.pad(v, (0, n * D - v.numel())).view(n, D))
    return torch.cat(out)


def tokens_to_adapter(
    tokens: Tensor, layout: TokenLayout, spec: AdapterSpec, template: Adapter | None = None
) -> Adapter:
    """Inverse of :func:`adapter_to_tokens`: trainables from ``tokens`` (T, D), frozen tensors from ``template``."""
    if tuple(tokens.shape) != (layout.num_tokens, layout.token_dim):
        raise ValueError(
            f"tokens have shape {tuple(tokens.shape)}, layout needs {(layout.num_tokens, layout.token_dim)}"
        )
    if spec.hash() != layout.spec_hash:
        raise ValueError("spec does not match the token layout")
    starts = [0]
    for n in layout.group_tokens:
        starts.append(starts[-1] + n)
    tensors: dict[str, Tensor] = dict(template.tensors) if template is not None else {}
    for e in layout.entries:
        flat = tokens[starts[e.group] : starts[e.group + 1]].reshape(-1)
        tensors[e.key] = flat[e.offset : e.offset + math.prod(e.shape)].reshape(e.shape).clone()
    return Adapter(spec, tensors)


def split_template(adapter: Adapter) -> tuple[Adapter, Adapter]:
    """``(trainable part, template)``: the template keeps the frozen tensors shared by all identities."""
    from .methods import get_method

    method = get_method(adapter.spec.method)
    train = set(method.trainable)
    strain = set(method.shared_trainable())
    t, f = {}, {}
    for k, v in adapter.tensors.items():
        pname = k.rpartition(SEP)[2]
        trainable = pname in strain if k.startswith(SHARED + SEP) else pname in train
        (t if trainable else f)[k] = v
    return Adapter(adapter.spec, t), Adapter(adapter.spec, f)


@dataclass
class TokenStats:
    """Dataset-level token normalisation: x̂ = (x − mean) / std on real values, padding stays 0."""

    mean: Tensor  # (T, D) for "element", (T, 1) for "token", (1, 1) for "global"
    std: Tensor  # same shape as mean, >= min_std
    mask: Tensor  # (T, D) bool, real values
    mode: str = "element"  # "element" | "token" | "global"
    count: int = 0  # adapters the statistics were computed from

    @classmethod
    def fit(cls, tokens, mask: Tensor, mode: str = "element", min_std: float = 1e-6) -> TokenStats:
        """Statistics from (N, T, D) tokens or an iterable of such batches (streamed in fp64)."""
        if mode not in STAT_MODES:
            raise ValueError(f"unknown stats mode {mode!r}; valid: {', '.join(STAT_MODES)}")
        batches = [tokens] if isinstance(tokens, Tensor) else tokens
        m = mask.double()  # (T, D)
        n, s, ss = 0, torch.zeros_like(m), torch.zeros_like(m)
        for b in batches:
            b = b.double() * m
            n += b.shape[0]
            s += b.sum(0)
            ss += (b * b).sum(0)
        if n == 0:
            raise ValueError("TokenStats.fit needs at least one adapter")
        if mode == "element":
            cnt = torch.full_like(m, float(n))
        else:
            dims = (1,) if mode == "token" else (0, 1)
            s, ss = s.sum(dims, keepdim=True), ss.sum(dims, keepdim=True)
            cnt = (m.sum(dims, keepdim=True) * n).clamp_min(1)
        mean = s / cnt
        var = (ss / cnt - mean * mean).clamp_min(0)
        std = var.sqrt().clamp_min(min_std)
        return cls(mean.float(), std.float(), mask.bool().clone(), mode, n)

    def normalize(self, x: Tensor) -> Tensor:
        """(…, T, D) tokens → normalised tokens (padding 0)."""
        mean, std, mask = (t.to(x.device) for t in (self.mean, self.std, self.mask))
        return ((x - mean) / std) * mask

    def denormalize(self, x: Tensor) -> Tensor:
        mean, std, mask = (t.to(x.device) for t in (self.mean, self.std, self.mask))
        return (x * std + mean) * mask

    def save(self, path: str | os.PathLike) -> None:
        """Atomic safetensors file with the statistics and their mode in the metadata."""
        from .safetensors_io import write_safetensors

        meta = {"difflora.token_stats": json.dumps({"mode": self.mode, "count": self.count})}
        write_safetensors(path, {"mean": self.mean, "std": self.std, "mask": self.mask.to(torch.uint8)}, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TokenStats:
        from .errors import AdapterFileError
        from .safetensors_io import read_safetensors

        t, meta = read_safetensors(path, allow_int=True)
        try:
            info = json.loads(meta["difflora.token_stats"])
            return cls(t["mean"], t["std"], t["mask"].bool(), info["mode"], int(info["count"]))
        except (KeyError, ValueError, TypeError) as e:
            raise AdapterFileError(f"not a token statistics file ({e})", "metadata", str(path)) from None


__all__ = [
    "STAT_MODES",
    "TokenEntry",
    "TokenLayout",
    "TokenStats",
    "adapter_to_tokens",
    "split_template",
    "tokens_to_adapter",
]
