"""Tiny seeded hypernetwork configs and synthetic datasets shared by the hypernet tests."""

from __future__ import annotations

import torch

from hypernet.config import AutoencoderConfig, DenoiserConfig, HypernetConfig, SamplingConfig, TrainConfig
from hypernet.data import HypernetDataset
from hypernet.model import HypernetModel
from hypernet.synthetic import SyntheticConfig, make_synthetic

torch.set_num_threads(1)


def tiny_config(ae_steps: int = 6, dn_steps: int = 8, **train_kw) -> HypernetConfig:
    """A 1-block, width-32 autoencoder and a 2-block, width-48 denoiser."""
    train = {"batch_size": 16, "ae_steps": ae_steps, "dn_steps": dn_steps, "warmup_steps": 2, "ema_decay": 0.9,
             "log_every": 1, "eval_every": 3, "ckpt_every": 4} | train_kw  # fmt: skip
    return HypernetConfig(
        AutoencoderConfig(hidden=32, heads=2, depth_enc=1, depth_dec=1, latent_tokens=4, latent_dim=8),
        DenoiserConfig(hidden=48, depth=2, heads=2),
        TrainConfig(**train),
        SamplingConfig(steps=5),
    )


def tiny_data(n: int = 48, seed: int = 0) -> HypernetDataset:
    return make_synthetic(SyntheticConfig(num_identities=n, seed=seed))


def tiny_model(data: HypernetDataset, cfg: HypernetConfig | None = None, seed: int = 0) -> HypernetModel:
    cfg = (cfg or tiny_config()).for_data(data.num_tokens, data.token_dim, data.num_layers, data.cond_dim)
    torch.manual_seed(seed)
    model = HypernetModel(cfg)
    model.set_layout(data.layer_ids, data.mask)
    return model.eval()


def randomize_zero_inits(model: HypernetModel, seed: int = 0) -> None:
    """Give the zero-initialised adaLN and final layers random weights, so outputs depend on every input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.denoiser.named_parameters():
            if "adaLN" in name or "final_layer" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
