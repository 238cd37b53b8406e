"""DiT-style denoiser over latent adapter tokens, conditioned on face embeddings.

* timestep -> adaLN-Zero modulation of every block (DiT), plus the masked mean of the condition tokens;
* condition tokens (one per reference photo: face embedding, optionally concatenated image features) ->
  cross-attention with a key padding mask, so any number of photos 1..N works in one batch;
* a learned null condition replaces the photos with probability ``cond_drop_prob`` while training, which
  gives classifier-free guidance at sampling time;
* zero-initialised adaLN gates and final layer: an untrained denoiser outputs exactly 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .config import DenoiserConfig
from .layers import Attention, Mlp, init_linears, modulate

# ----------------------------------------------------------------------------------------------------------------
# Embedders
# ----------------------------------------------------------------------------------------------------------------


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors (sinusoidal frequencies, then an MLP), as in DiT."""

    def __init__(self, hidden: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    @staticmethod
    def frequencies(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        """t (B,) -> (B, dim) sinusoidal embedding."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]  # (B, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(self.frequencies(t, self.freq_dim))  # (B, H)


# ----------------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------------


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention + cross-attention to the condition tokens + adaLN-Zero MLP."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, eps=1e-6)
        self.cross_attn = Attention(hidden, heads)
        self.norm3 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: Tensor, c: Tensor, ctx: Tensor, ctx_mask: Tensor) -> Tensor:
        """x (B, L, H); c (B, H); ctx (B, P, H); ctx_mask (B, P) bool. Returns (B, L, H)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.cross_attn(self.norm2(x), ctx, ctx_mask)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm3(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # each (B, H)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, L, out_dim)


# ----------------------------------------------------------------------------------------------------------------
# Denoiser
# ----------------------------------------------------------------------------------------------------------------


class Denoiser(nn.Module):
    def __init__(self, cfg: DenoiserConfig, latent_tokens: int, latent_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden
        self.x_proj = nn.Linear(latent_dim, H)
        self.pos = nn.Parameter(torch.zeros(1, latent_tokens, H))
        self.t_embedder = TimestepEmbedder(H)
        self.cond_proj = nn.Sequential(nn.Linear(cfg.cond_dim, H), nn.SiLU(), nn.Linear(H, H))
        self.null_cond = nn.Parameter(torch.zeros(1, 1, H))  # learned "no photos" token (CFG)
        self.pool_mlp = nn.Sequential(nn.SiLU(), nn.Linear(H, H))  # pooled condition -> adaLN input
        self.blocks = nn.ModuleList(DiTBlock(H, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(H, latent_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # basic init: xavier-uniform linears, zero biases
        init_linears(self)
        # learned positions and null condition: small normal
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.null_cond, std=0.02)
        # timestep MLP: normal(0.02), as in DiT
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: zero the modulation of every block, so each block starts as the identity
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        # final layer: zero modulation and projection, so the untrained model predicts exactly 0
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def condition(self, cond: Tensor, cond_mask: Tensor, drop: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """cond (B, P, E), cond_mask (B, P) bool, drop (B,) bool or None -> ctx (B, P, H), mask (B, P), pooled (B, H).

        Dropped rows see only the learned null token (first slot, the others masked out).
        """
        if cond.ndim != 3 or cond_mask.shape != cond.shape[:2]:
            raise ValueError(
                f"cond must be (B, P, E) with mask (B, P); got {tuple(cond.shape)}, {tuple(cond_mask.shape)}"
            )
        if not bool(cond_mask.any(dim=1).all()):
            raise ValueError("every row needs at least one condition token (use drop=True for the null condition)")
        ctx = self.cond_proj(cond)  # (B, P, H)
        if drop is not None:
            null_mask = torch.zeros_like(cond_mask)
            null_mask[:, 0] = True
            ctx = torch.where(drop[:, None, None], self.null_cond.to(ctx.dtype).expand_as(ctx), ctx)
            cond_mask = torch.where(drop[:, None], null_mask, cond_mask)
        m = cond_mask.unsqueeze(-1).to(ctx.dtype)  # (B, P, 1)
        pooled = (ctx * m).sum(1) / m.sum(1)  # (B, H)
        return ctx, cond_mask, pooled

    def forward(self, x: Tensor, t: Tensor, cond: Tensor, cond_mask: Tensor, drop: Tensor | None = None) -> Tensor:
        """x (B, T_lat, D_lat) noisy latents; t (B,) timesteps; cond (B, P, E); cond_mask (B, P) bool, True = a
        real photo; drop (B,) bool: use the null condition. Returns the prediction (B, T_lat, D_lat)."""
        h = self.x_proj(x) + self.pos  # (B, T_lat, H)
        ctx, ctx_mask, pooled = self.condition(cond, cond_mask, drop)
        c = self.t_embedder(t) + self.pool_mlp(pooled)  # (B, H)
        for blk in self.blocks:
            h = blk(h, c, ctx, ctx_mask)
        return self.final_layer(h, c)  # (B, T_lat, D_lat)

    def forward_with_cfg(self, x: Tensor, t: Tensor, cond: Tensor, cond_mask: Tensor, scale: float) -> Tensor:
        """Classifier-free guidance: uncond + scale * (cond - uncond), one doubled batch. Shapes as forward."""
        B = x.shape[0]
        drop = torch.cat([torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)]).to(x.device)
        out = self(
            torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, cond]), torch.cat([cond_mask, cond_mask]), drop
        )
        out_c, out_u = out.chunk(2)  # each (B, T_lat, D_lat)
        return out_u + scale * (out_c - out_u)
