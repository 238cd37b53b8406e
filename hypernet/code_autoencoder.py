"""The ``basis`` autoencoder kind: the hypernet generates identity-basis codes (``weights.basis``) directly.

An identity's adapter is a code ``c ∈ R^K`` of a shared identity basis (``difflora data basis``); the basis plays
the role DiffLoRA's weight autoencoder's decoder plays for free adapters (code -> adapter, ``basis_to_lora``), so
there is nothing to train in this stage: encode and decode are the identity and the denoiser's latent *is* the
(normalised) code, cut into T tokens of D values (:func:`code_token_shape`, the last token zero-padded when D does
not divide K, the padding masked out like any token padding).

    T, D = code_token_shape(32)              # (4, 8)
    tokens = codes_to_tokens(codes, T, D)    # (N, 32) -> (N, 4, 8)
    codes = tokens_to_codes(tokens, 32)      # back
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .config import AutoencoderConfig


def code_token_shape(k: int) -> tuple[int, int]:
    """(T, D) for a K-value code: D is the smallest divisor of K not below √K (tokens of similar length and count:
    32 -> (4, 8), 64 -> (8, 8), 128 -> (8, 16)); when that divisor exceeds 2√K (K prime or nearly so) D = ⌈√K⌉
    and the last token is padded."""
    if k < 1:
        raise ValueError(f"a code needs K >= 1 values, got {k}")
    root = math.sqrt(k)
    d = next(d for d in range(math.ceil(root), k + 1) if k % d == 0)
    if d > 2 * root:
        d = math.ceil(root)
    return math.ceil(k / d), d


def code_mask(k: int, num_tokens: int, token_dim: int) -> Tensor:
    """(T, D) bool: True for the K real code entries, False for the padding of the last token."""
    if num_tokens * token_dim < k:
        raise ValueError(f"{num_tokens} x {token_dim} tokens cannot hold a {k}-value code")
    return (torch.arange(num_tokens * token_dim) < k).view(num_tokens, token_dim)


def codes_to_tokens(codes: Tensor, num_tokens: int, token_dim: int) -> Tensor:
    """codes (N, K) -> tokens (N, T, D), zero-padded (autograd kept)."""
    n, k = codes.shape
    pad = num_tokens * token_dim - k
    if pad < 0:
        raise ValueError(f"{num_tokens} x {token_dim} tokens cannot hold a {k}-value code")
    return torch.nn.functional.pad(codes, (0, pad)).view(n, num_tokens, token_dim)


def tokens_to_codes(tokens: Tensor, k: int) -> Tensor:
    """tokens (N, T, D) -> codes (N, K) (autograd kept)."""
    return tokens.reshape(tokens.shape[0], -1)[:, :k]


class CodeAutoencoder(nn.Module):
    """Identity encode/decode (no parameters) with the ``layer_ids`` buffer every autoencoder kind carries."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("layer_ids", torch.zeros(cfg.num_tokens, dtype=torch.long))  # (T,) all 0: one "layer"

    def set_layer_ids(self, layer_ids: Tensor) -> None:
        if layer_ids.shape != (self.cfg.num_tokens,):
            raise ValueError(f"layer_ids must have shape ({self.cfg.num_tokens},), got {tuple(layer_ids.shape)}")
        self.layer_ids.copy_(layer_ids)

    def encode(self, x: Tensor) -> Tensor:
        """Normalised code tokens (B, T, D) -> the latent (B, T, D): the same tensor."""
        return x

    def decode(self, z: Tensor) -> Tensor:
        return z

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return x
