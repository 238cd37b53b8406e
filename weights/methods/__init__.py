"""Registry of adapter methods (one file each; math in docs/weights.md §1).

``METHODS`` maps a registry name (``AdapterSpec.method``) to a stateless ``AdapterMethod`` singleton.
"""

from __future__ import annotations

from ..spec import AdapterSpec
from .arc import ARC
from .base import AdapterMethod, MethodConfig
from .dora import DoRA
from .hta import HTA
from .loldu import LoLDU
from .lora import LoRA
from .snell import SNELL
from .svfit import SVFit
from .tlora import TLoRA

METHODS: dict[str, AdapterMethod] = {
    m.name: m for m in (LoRA(), DoRA(), SVFit(), LoLDU(), TLoRA(), HTA(), ARC(), SNELL())
}


def get_method(name: str) -> AdapterMethod:
    """The method registered under ``name``; ValueError listing the valid names otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown adapter method {name!r}; valid: {', '.join(sorted(METHODS))}") from None


def method_config(spec: AdapterSpec) -> MethodConfig:
    """The per-layer MethodConfig of a spec: rank, scale = alpha / rank, sorted method params."""
    return MethodConfig(rank=spec.rank, scale=spec.scale, params=tuple(sorted(spec.params.items())))


__all__ = sorted(["METHODS", "AdapterMethod", "MethodConfig", "get_method", "method_config"])
