"""The whole hypernetwork as one module: weight autoencoder + denoiser + the dataset statistics they need.

Its ``state_dict`` (saved as safetensors) therefore carries the token layout (layer ids, mask), the token
normalisation statistics and the latent statistics next to the weights: a checkpoint is self-contained.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .autoencoder import WeightAutoencoder
from .code_autoencoder import CodeAutoencoder
from .config import HypernetConfig
from .denoiser import Denoiser
from .diffusion import GaussianDiffusion
from .linear_autoencoder import LinearAutoencoder


class HypernetModel(nn.Module):
    def __init__(self, cfg: HypernetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ae, dn = cfg.autoencoder, cfg.denoiser
        kinds = {"transformer": WeightAutoencoder, "linear": LinearAutoencoder, "basis": CodeAutoencoder}
        self.autoencoder = kinds[ae.kind](ae)
        T_lat, D_lat = ae.latent_shape
        self.denoiser = Denoiser(dn, T_lat, D_lat)
        T, D = ae.num_tokens, ae.token_dim
        self.register_buffer("mask", torch.ones(T, D, dtype=torch.bool))  # (T, D) real entries
        self.register_buffer("token_mean", torch.zeros(T, D))  # (T, D)
        self.register_buffer("token_std", torch.ones(T, D))  # (T, D)
        self.register_buffer("token_scale", torch.ones(()))  # () mean |x_raw|, for the magnitude weight
        self.register_buffer("latent_mean", torch.zeros(T_lat, D_lat))  # (T_lat, D_lat)
        self.register_buffer("latent_std", torch.ones(()))  # ()

    def diffusion(self) -> GaussianDiffusion:
        dn = self.cfg.denoiser
        return GaussianDiffusion(dn.num_timesteps, dn.schedule, dn.prediction)

    def set_layout(self, layer_ids: Tensor, mask: Tensor) -> None:
        if mask.shape != self.mask.shape:
            raise ValueError(f"mask must be {tuple(self.mask.shape)}, got {tuple(mask.shape)}")
        self.autoencoder.set_layer_ids(layer_ids)
        self.mask.copy_(mask)

    def set_token_stats(self, mean: Tensor, std: Tensor, scale: Tensor) -> None:
        self.token_mean.copy_(mean)
        self.token_std.copy_(std)
        self.token_scale.copy_(scale)

    # tokens: raw (B, T, D) <-> normalised (B, T, D); padded entries are 0 in both
    def normalize_tokens(self, raw: Tensor) -> Tensor:
        # a zero std (the untrained predictor pins every token to its mean) maps to 0, not to inf/NaN
        z = (raw - self.token_mean) / torch.where(self.token_std > 0, self.token_std, torch.ones_like(self.token_std))
        return z * (self.token_std > 0) * self.mask

    def denormalize_tokens(self, norm: Tensor) -> Tensor:
        return (norm * self.token_std + self.token_mean) * self.mask

    # latents: autoencoder space (B, T_lat, D_lat) <-> diffusion space (zero mean, unit std)
    def normalize_latent(self, z: Tensor) -> Tensor:
        return (z - self.latent_mean) / self.latent_std

    def denormalize_latent(self, zn: Tensor) -> Tensor:
        return zn * self.latent_std + self.latent_mean

    def encode_raw(self, raw: Tensor) -> Tensor:
        """Raw tokens (B, T, D) -> diffusion-space latents (B, T_lat, D_lat) (no noise augmentation)."""
        return self.normalize_latent(self.autoencoder.encode(self.normalize_tokens(raw)))

    def decode_raw(self, zn: Tensor) -> Tensor:
        """Diffusion-space latents (B, T_lat, D_lat) -> raw tokens (B, T, D), padded entries 0."""
        return self.denormalize_tokens(self.autoencoder.decode(self.denormalize_latent(zn)))

    def fit_latent_stats(self, raw: Tensor, batch_size: int = 256) -> Tensor:
        """Set latent mean (T_lat, D_lat) and scalar std from the training adapters; returns their normalised
        latents (N, T_lat, D_lat)."""
        with torch.no_grad():
            z = torch.cat([self.autoencoder.encode(self.normalize_tokens(raw[i : i + batch_size]))
                           for i in range(0, raw.shape[0], batch_size)])  # fmt: skip
            self.latent_mean.copy_(z.mean(0))
            self.latent_std.copy_((z - z.mean(0)).std().clamp_min(1e-6))
            return self.normalize_latent(z)
