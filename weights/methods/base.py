"""The contract every adapter method implements (one method per file in this package).

An adapter's parameters for one layer are a ``dict[str, Tensor]`` ("layer params"). Some tensors are
trainable (they vary from identity to identity and become hypernetwork tokens), others are frozen buffers
derived from the base weight (SVFit's singular vectors, LoLDU's LU factors and pivots, ...). Methods whose
parameters are shared between layers (ARC's down-projection per width) declare them via ``shared_key``:
those tensors live once in the adapter under ``"shared::<key>::<pname>"`` and are passed into each layer's
params dict under their plain name.

Notation (peft-methods.md): W is (m, n) = (d_out, d_in); conv weights are (m, n, kh, kw) and are handled
on their (m, n*kh*kw) matrix view unless a method says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor


@dataclass(frozen=True)
class MethodConfig:
    """Hyper-parameters a method sees for one layer."""

    rank: int = 4  # r
    scale: float = 1.0  # s = alpha / r where the method has one
    params: tuple[tuple[str, object], ...] = ()  # method-specific extras as sorted (key, value) pairs

    def get(self, key: str, default: object = None) -> object:
        return dict(self.params).get(key, default)


class AdapterMethod:
    """Base class: pure tensor functions plus metadata. Subclasses are stateless singletons."""

    name: ClassVar[str] = ""
    trainable: ClassVar[tuple[str, ...]] = ()  # names of trainable tensors in the layer params
    supports_conv: ClassVar[bool] = False  # may target Conv2d (via the matrix view)
    zero_init: ClassVar[bool] = True  # ΔW == 0 right after init_layer
    multiplicative: ClassVar[bool] = False  # effective weight depends on W beyond W + ΔW(params)
    has_bias_delta: ClassVar[bool] = False  # also changes the layer bias when merged (ARC)

    # ---- per-layer pure functions -------------------------------------------------------------------
    def init_layer(self, W: Tensor, cfg: MethodConfig, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Initial params (trainable and frozen) for one layer with frozen weight W (m, n[, kh, kw])."""
        raise NotImplementedError

    def delta(self, W: Tensor, p: dict[str, Tensor], cfg: MethodConfig) -> Tensor:
        """ΔW = W' − W, same shape and dtype as W, computed in fp32 internally."""
        raise NotImplementedError

    def bias_delta(self, W: Tensor, p: dict[str, Tensor], cfg: MethodConfig) -> Tensor | None:
        """Δb (m,) for methods that move the bias when merged; None otherwise."""
        return None

    def num_trainable(self, shape: tuple[int, ...], cfg: MethodConfig) -> int:
        """Trainable parameter count for one layer of this shape (shared tensors not included)."""
        raise NotImplementedError

    # ---- shared tensors (ARC) ------------------------------------------------------------------------
    def shared_key(self, shape: tuple[int, ...], cfg: MethodConfig) -> str | None:
        """Key of the shared tensor group this layer uses, or None."""
        return None

    def init_shared(self, shape: tuple[int, ...], cfg: MethodConfig, generator: torch.Generator | None = None):
        """Initial shared tensors for the group of ``shared_key(shape)``."""
        return {}

    def shared_trainable(self) -> tuple[str, ...]:
        return ()
