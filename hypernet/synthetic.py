"""A synthetic LoRA dataset whose structure resembles the real one, for tests and demo runs.

Each identity has a latent vector z ~ N(0, I_k). A fixed random non-linear map turns z into rank-r LoRA factors
B_l (d, r) and A_l (r, d) for every layer l (layers have different magnitudes, like real adapters), plus
per-identity "fine-tuning noise" that no condition can predict. Each identity has P_i photos; a photo's
embedding is the L2-normalised noisy projection of the same z. So conditioning carries real but partial
information: a good hypernetwork beats the mean adapter, and none reaches zero error.

Tokens: each layer's [B.flatten(), A.flatten()] is cut into chunks of ``token_dim`` entries (the last chunk
zero-padded and masked), so layers give several tokens that share a layer id, as in ``weights/tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import HypernetDataset


@dataclass
class SyntheticConfig:
    num_identities: int = 320  # N
    num_layers: int = 4  # adapted layers
    dim: int = 12  # each layer is a (dim x dim) linear
    rank: int = 2  # LoRA rank r
    token_dim: int = 20  # D: entries per token (2 * dim * rank = 48 entries -> 3 tokens, the last one padded)
    latent_dim: int = 6  # k: identity latent dimension
    embed_dim: int = 32  # E: face-embedding dimension
    min_photos: int = 2  # photos per identity, uniform in [min_photos, max_photos]
    max_photos: int = 6
    identity_noise: float = 0.1  # unpredictable per-identity noise, relative to the signal
    photo_noise: float = 0.5  # per-photo embedding noise, relative to the projected identity
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_identities", "num_layers", "dim", "rank", "token_dim", "latent_dim", "embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"synthetic {name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.min_photos <= self.max_photos:
            raise ValueError(f"synthetic photos need 1 <= min_photos <= max_photos, got {self.min_photos}, "
                             f"{self.max_photos}")  # fmt: skip


def _chunk(v: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """(n,) -> zero-padded chunks (ceil(n/size), size) and their mask."""
    n_tok = -(-v.shape[0] // size)
    out = v.new_zeros(n_tok * size)
    mask = torch.zeros(n_tok * size, dtype=torch.bool)
    out[: v.shape[0]] = v
    mask[: v.shape[0]] = True
    return out.view(n_tok, size), mask.view(n_tok, size)


def make_synthetic(cfg: SyntheticConfig | None = None) -> HypernetDataset:
    """Build the synthetic dataset (deterministic for ``cfg.seed``)."""
    c = cfg or SyntheticConfig()
    g = torch.Generator().manual_seed(c.seed)
    N, k, d, r = c.num_identities, c.latent_dim, c.dim, c.rank
    z = torch.randn(N, k, generator=g)  # (N, k) identities
    # fixed random map z -> LoRA factors, non-linear through a hidden layer
    w1 = torch.randn(k, 32, generator=g) / k**0.5  # (k, 32)
    hidden = torch.tanh(z @ w1 + 0.3 * torch.randn(32, generator=g))  # (N, 32)
    rows, masks, layer_ids = [], [], []
    for layer in range(c.num_layers):
        scale = 2.0 ** (layer - c.num_layers / 2)  # layers differ in magnitude
        wb = torch.randn(32, d * r, generator=g) / 32**0.5  # (32, d*r)
        wa = torch.randn(32, r * d, generator=g) / 32**0.5  # (32, r*d)
        a0 = torch.randn(r * d, generator=g) / d**0.5  # shared part of A (like a common init direction)
        B = scale * (hidden @ wb)  # (N, d*r)
        A = a0 + 0.5 * (hidden @ wa)  # (N, r*d)
        flat = torch.cat([B, A], dim=1)  # (N, 2*d*r)
        flat = flat + c.identity_noise * flat.std(0, keepdim=True) * torch.randn(flat.shape, generator=g)
        chunks = [_chunk(flat[i], c.token_dim) for i in range(N)]
        rows.append(torch.stack([ch[0] for ch in chunks]))  # (N, n_tok, D)
        masks.append(chunks[0][1])  # (n_tok, D)
        layer_ids += [layer] * chunks[0][0].shape[0]
    tokens = torch.cat(rows, dim=1)  # (N, T, D)
    mask = torch.cat(masks)  # (T, D)
    # face embeddings: noisy projections of z, L2-normalised (like ArcFace / dlib descriptors)
    proj = torch.randn(k, c.embed_dim, generator=g) / k**0.5  # (k, E)
    cond = []
    for i in range(N):
        p = int(torch.randint(c.min_photos, c.max_photos + 1, (1,), generator=g))
        clean = (z[i] @ proj)[None]  # (1, E)
        noisy = clean + c.photo_noise * clean.norm() / c.embed_dim**0.5 * torch.randn(p, c.embed_dim, generator=g)
        cond.append(F.normalize(noisy, dim=-1))  # (P_i, E)
    names = [f"synthetic_{i:05d}" for i in range(N)]
    return HypernetDataset.from_tensors(tokens, cond, names, mask=mask, layer_ids=torch.tensor(layer_ids))
