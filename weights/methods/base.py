"""The contract every adapter method implements (one method per file in this package).

An adapter's parameters for one layer are a ``dict[str, Tensor]`` ("layer params"). Some tensors are
trainable (they vary from identity to identity and become hypernetwork tokens), others are frozen buffers
derived from the base weight (SVFit's singular vectors, LoLDU's LU factors and pivots, ...). Methods whose
parameters are shared between layers (ARC's down-projection per width) declare them via ``shared_key``:
those tensors live once in the adapter under ``"shared::<key>::<pname>"`` and are passed into each layer's
params dict under their plain name.

Notation (docs/weights.md): W is (m, n) = (d_out, d_in); conv weights are (m, n, kh, kw) and are handled
on their (m, n*kh*kw) matrix view unless a method says otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

# The layer's own op with its hyper-parameters bound: (x, weight, bias) -> y. F.linear for Linear, the layer's
# conv (stride, padding, dilation) for Conv2d. Used by the training-time wrapper (weights.inject).
LayerOp = Callable[[Tensor, Tensor, Tensor | None], Tensor]


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
    frozen: ClassVar[tuple[str, ...]] = ()  # names of frozen tensors derived from W (rebuilt by init_layer)
    supports_conv: ClassVar[bool] = False  # may target Conv2d (via the matrix view)
    zero_init: ClassVar[bool] = True  # ΔW == 0 right after init_layer
    rank_le_min_dim: ClassVar[bool] = False  # rank counts components of W itself (SVD / LU), so r <= min(m, n)
    multiplicative: ClassVar[bool] = False  # effective weight depends on W beyond W + ΔW(params)
    has_bias_delta: ClassVar[bool] = False  # also changes the layer bias when merged (ARC)
    conv_1x1_only: ClassVar[bool] = False  # with supports_conv: only 1x1 kernels (math exact only there)
    param_keys: ClassVar[tuple[str, ...]] = ()  # the AdapterSpec.params keys the method reads (cfg.get)

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

    # ---- checks and training-time forward ------------------------------------------------------------
    def check_shape(self, shape: tuple[int, ...], cfg: MethodConfig) -> None:
        """Raise ValueError if this method cannot adapt a weight of this shape."""
        if len(shape) not in (2, 4):
            raise ValueError(f"{self.name}: weight shape {tuple(shape)} is neither Linear (2-D) nor Conv2d (4-D)")
        if len(shape) == 4:
            if not self.supports_conv:
                raise ValueError(f"{self.name}: Conv2d weights {tuple(shape)} are not supported")
            if self.conv_1x1_only and tuple(shape[2:]) != (1, 1):
                raise ValueError(f"{self.name}: only 1x1 Conv2d is supported, got kernel {tuple(shape[2:])}")
        if self.rank_le_min_dim:
            k = min(shape[0], int(torch.Size(shape[1:]).numel()))
            if cfg.rank > k:
                raise ValueError(f"{self.name}: rank {cfg.rank} exceeds min(m, n) = {k} for weight {tuple(shape)}")

    def forward(
        self, x: Tensor, W: Tensor, b: Tensor | None, p: dict[str, Tensor], cfg: MethodConfig, op: LayerOp
    ) -> Tensor:
        """Adapted layer output. Default: the layer op with the merged weight W + ΔW and bias b + Δb."""
        Wp = W + self.delta(W, p, cfg)
        db = self.bias_delta(W, p, cfg)
        if db is not None:
            b = db if b is None else b + db
        return op(x, Wp, b)


# ---- helpers shared by the method files --------------------------------------------------------------
def as_matrix(W: Tensor) -> Tensor:
    """(m, n[, kh, kw]) -> fp32 (m, n*kh*kw) matrix view."""
    return W.detach().reshape(W.shape[0], -1).float()


def like(dW: Tensor, W: Tensor) -> Tensor:
    """fp32 (m, n_flat) ΔW -> W's shape and dtype."""
    return dW.reshape(W.shape).to(W.dtype)


def randn(shape: tuple[int, ...], generator: torch.Generator | None, device=None) -> Tensor:
    """N(0, 1) sampled on the generator's device (a CPU generator works for CUDA weights), then moved."""
    gdev = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gdev).to(device)


def kaiming_uniform(
    shape: tuple[int, ...], generator: torch.Generator | None, device=None, fan_in: int | None = None
) -> Tensor:
    """kaiming_uniform_(a=sqrt(5)) as nn.Linear / peft LoRA A: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in=shape[1]
    unless given."""
    gdev = generator.device if generator is not None else device
    bound = 1.0 / (shape[1] if fan_in is None else fan_in) ** 0.5
    return ((torch.rand(shape, generator=generator, device=gdev) * 2 - 1) * bound).to(device)


def lowrank_forward(x: Tensor, W: Tensor, b: Tensor | None, down: Tensor, up: Tensor, op: LayerOp) -> Tensor:
    """op(x, W, b) + up @ down @ x without materialising ΔW; down (r, n_flat), up (m, r).

    For Conv2d the down projection runs as a conv with W's kernel (r, n, kh, kw) and the up as a 1x1 conv.
    """
    y = op(x, W, b)
    down, up = down.to(x.dtype), up.to(x.dtype)
    if W.dim() == 2:
        return y + F.linear(F.linear(x, down), up)  # (..., r) -> (..., m)
    h = op(x, down.reshape(down.shape[0], *W.shape[1:]), None)  # (B, r, H', W')
    return y + F.conv2d(h, up[:, :, None, None])  # (B, m, H', W')
