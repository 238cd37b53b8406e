"""Adapter spec: which method, its hyper-parameters, and which layers of which base model it targets."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field, fields
from typing import Any

SPEC_VERSION = 1


@dataclass(frozen=True)
class LayerInfo:
    """One targeted layer of the base model."""

    name: str  # module path in the base model, e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    shape: tuple[int, ...]  # weight shape: (d_out, d_in) for Linear, (d_out, d_in, kh, kw) for Conv2d
    kind: str = "linear"  # "linear" | "conv"

    @property
    def d_out(self) -> int:
        return self.shape[0]

    @property
    def d_in(self) -> int:
        return self.shape[1]


def _layer_from_dict(d: dict[str, Any]) -> LayerInfo:
    return LayerInfo(d["name"], tuple(d["shape"]), d.get("kind", "linear"))


@dataclass
class AdapterSpec:
    """Everything needed to rebuild, validate and apply an adapter, serialised as JSON in safetensors metadata."""

    method: str = "lora"  # registry name of the method (weights.methods.METHODS)
    rank: int = 4  # rank r (meaning per method: LoRA rank, SVFit/LoLDU number of components, ...)
    alpha: float | None = None  # scale numerator; None means alpha = rank (scale 1), as diffusers' scripts do
    params: dict[str, Any] = field(default_factory=dict)  # method-specific hyper-parameters
    targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])  # module patterns
    layers: list[LayerInfo] = field(default_factory=list)  # the targeted layers, in a fixed order
    base_model: str = ""  # id of the base model the adapter belongs to (e.g. "tiny", "sd15", "sdxl")
    component: str = "unet"  # which pipeline component the layer names refer to
    version: int = SPEC_VERSION  # spec format version

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        self.layers = [lay if isinstance(lay, LayerInfo) else _layer_from_dict(lay) for lay in self.layers]

    @property
    def scale(self) -> float:
        """s = alpha / r (LoRA convention)."""
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    def layer(self, name: str) -> LayerInfo:
        for lay in self.layers:
            if lay.name == name:
                return lay
        raise KeyError(f"layer {name!r} is not targeted by this adapter")

    def to_dict(self) -> dict[str, Any]:
        # field by field, in field order as dataclasses.asdict gave: its deep recursion into every LayerInfo cost
        # milliseconds on the tiny spec's 106 layers, and predict() hashes the spec on every call
        layers = [{"name": lay.name, "shape": list(lay.shape), "kind": lay.kind} for lay in self.layers]
        return {f.name: layers if f.name == "layers" else copy.deepcopy(getattr(self, f.name)) for f in fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterSpec:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    @classmethod
    def from_json(cls, s: str) -> AdapterSpec:
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise ValueError(f"adapter spec is not valid JSON: {e}") from None
        if not isinstance(d, dict) or "method" not in d:
            raise ValueError("adapter spec JSON must be an object with a 'method' field")
        return cls.from_dict(d)

    def hash(self) -> str:
        """Stable hash of everything that defines the weight space (not the base-model id string)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


def match_targets(name: str, patterns: list[str]) -> bool:
    """True if a module path matches one of the target patterns.

    A plain pattern matches a suffix on a module boundary (``to_q`` matches ``...attn1.to_q``,
    ``to_out.0`` matches ``...to_out.0``); a pattern starting with ``re:`` is a full regular expression.
    """
    for p in patterns:
        if p.startswith("re:"):
            if re.fullmatch(p[3:], name):
                return True
        elif name == p or name.endswith("." + p):
            return True
    return False
