"""DiffLoRA's weight autoencoder (LAE): adapter tokens (B, T, D) <-> compact latent tokens (B, T_lat, D_lat).

Encoder: tokens + per-token position + layer embeddings, prefixed by T_lat learned query tokens, through a
transformer; the query positions become the latent (parameter-free LayerNorm: every latent token has unit RMS,
so the training noise on it has a fixed meaning and the diffusion model sees unit-scale data).
Decoder: the latent tokens, followed by T learned output queries (position + layer embeddings), through a
transformer; the query positions are projected back to D entries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import AutoencoderConfig
from .layers import Block, init_linears


class WeightAutoencoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        H, T, D = cfg.hidden, cfg.num_tokens, cfg.token_dim
        # encoder
        self.in_proj = nn.Linear(D, H)
        self.token_pos = nn.Parameter(torch.zeros(1, T, H))  # which token of the adapter
        self.layer_emb = nn.Embedding(cfg.num_layers, H)  # which layer the token belongs to
        self.latent_queries = nn.Parameter(torch.zeros(1, cfg.latent_tokens, H))
        self.encoder = nn.ModuleList(Block(H, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth_enc))
        self.enc_norm = nn.LayerNorm(H)
        self.to_latent = nn.Linear(H, cfg.latent_dim)
        # decoder
        self.from_latent = nn.Linear(cfg.latent_dim, H)
        self.latent_pos = nn.Parameter(torch.zeros(1, cfg.latent_tokens, H))
        self.out_queries = nn.Parameter(torch.zeros(1, T, H))
        self.decoder = nn.ModuleList(Block(H, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth_dec))
        self.dec_norm = nn.LayerNorm(H)
        self.out_proj = nn.Linear(H, D)
        # layout: the layer id of every token (set from the dataset, saved with the weights)
        self.register_buffer("layer_ids", torch.zeros(T, dtype=torch.long))  # (T,)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # all linear layers: xavier-uniform, zero bias
        init_linears(self)
        # learned positions, queries and layer embeddings: small normal
        for p in (self.token_pos, self.latent_queries, self.latent_pos, self.out_queries):
            nn.init.normal_(p, std=0.02)
        nn.init.normal_(self.layer_emb.weight, std=0.02)

    def set_layer_ids(self, layer_ids: Tensor) -> None:
        if layer_ids.shape != (self.cfg.num_tokens,):
            raise ValueError(f"layer_ids must have shape ({self.cfg.num_tokens},), got {tuple(layer_ids.shape)}")
        if int(layer_ids.min()) < 0 or int(layer_ids.max()) >= self.cfg.num_layers:
            raise ValueError(f"layer ids must lie in [0, {self.cfg.num_layers}), got max {int(layer_ids.max())}")
        self.layer_ids.copy_(layer_ids)

    def encode(self, x: Tensor) -> Tensor:
        """x (B, T, D) normalised tokens (padded entries 0) -> latent (B, T_lat, D_lat), unit RMS per token."""
        B, n_lat = x.shape[0], self.cfg.latent_tokens
        h = self.in_proj(x) + self.token_pos + self.layer_emb(self.layer_ids)  # (B, T, H)
        h = torch.cat([self.latent_queries.expand(B, -1, -1), h], dim=1)  # (B, T_lat + T, H)
        for blk in self.encoder:
            h = blk(h)
        z = self.to_latent(self.enc_norm(h[:, :n_lat]))  # (B, T_lat, D_lat)
        return F.layer_norm(z, (self.cfg.latent_dim,))

    def decode(self, z: Tensor) -> Tensor:
        """z (B, T_lat, D_lat) -> normalised tokens (B, T, D)."""
        B, n_lat = z.shape[0], self.cfg.latent_tokens
        queries = (self.out_queries + self.layer_emb(self.layer_ids)).expand(B, -1, -1)  # (B, T, H)
        h = torch.cat([self.from_latent(z) + self.latent_pos, queries], dim=1)  # (B, T_lat + T, H)
        for blk in self.decoder:
            h = blk(h)
        return self.out_proj(self.dec_norm(h[:, n_lat:]))  # (B, T, D)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Training reconstruction with noise augmentation on input and latent: (B, T, D) -> (B, T, D)."""
        if self.training and self.cfg.input_noise > 0:
            x = x + self.cfg.input_noise * _randn_like(x, generator)
        z = self.encode(x)
        if self.training and self.cfg.latent_noise > 0:
            z = z + self.cfg.latent_noise * _randn_like(z, generator)
        return self.decode(z)


def reconstruction_loss(pred: Tensor, target: Tensor, weight: Tensor, mask: Tensor) -> Tensor:
    """Magnitude-weighted masked MSE.

    pred, target: (B, T, D) normalised tokens; weight: (B, T, D) per-entry weights (1 + lambda |x_raw| / s);
    mask: (T, D) bool, False for padded entries. Returns a scalar.
    """
    w = weight * mask  # (B, T, D)
    return (w * (pred.float() - target) ** 2).sum() / w.sum().clamp_min(1e-12)


def magnitude_weight(raw: Tensor, scale: Tensor | float, lam: float) -> Tensor:
    """w = 1 + lam * |x_raw| / scale, (B, T, D): large-magnitude entries matter most for the adapter's effect."""
    return 1.0 + lam * raw.abs() / scale


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Gaussian noise shaped like x, drawn on the generator's device (CPU generators stay valid on CUDA)."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device).to(x)
