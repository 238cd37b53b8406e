"""An adapter = its spec + a flat dict of tensors.

Tensor keys: ``"<layer name>::<param name>"`` for per-layer tensors (e.g.
``"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q::A"``) and ``"shared::<group>::<param name>"``
for tensors shared by several layers (ARC). Which tensors are trainable is defined by the method.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .spec import AdapterSpec

SEP = "::"
SHARED = "shared"


def layer_key(layer: str, pname: str) -> str:
    return f"{layer}{SEP}{pname}"


def split_key(key: str) -> tuple[str, str]:
    """``"a.b::A"`` -> ``("a.b", "A")``; shared keys give ``("shared::group", pname)``."""
    head, _, pname = key.rpartition(SEP)
    if not head:
        raise ValueError(f"adapter tensor key {key!r} has no '{SEP}' separator")
    return head, pname


@dataclass
class Adapter:
    """A method's parameters for every targeted layer, plus the spec that gives them meaning."""

    spec: AdapterSpec
    tensors: dict[str, Tensor] = field(default_factory=dict)

    def layer_params(self, layer: str) -> dict[str, Tensor]:
        """Params of one layer, with the layer's shared tensors (if any) merged in under their plain names."""
        prefix = layer + SEP
        p = {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}
        return p

    def shared_params(self, group: str) -> dict[str, Tensor]:
        prefix = f"{SHARED}{SEP}{group}{SEP}"
        return {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Adapter:
        """Move/cast; ``dtype`` applies to floating tensors only (LoLDU's int64 ``perm`` stays an index)."""
        return Adapter(
            self.spec,
            {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in self.tensors.items()},
        )

    def num_params(self) -> int:
        return sum(v.numel() for v in self.tensors.values())
