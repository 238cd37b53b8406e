"""Architecture of the tiny base model: configs, builders and the latent normalisation fold."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from pipeline_data.tiny.crops import ALL_DATASETS, CROP_SIZE, DATASETS


@dataclass
class VAEConfig:
    """AutoencoderKL: RGB crops <-> latents (v1: 64x64 <-> 16x16x4, 4x downsampling; v2: 128x128 <-> 16x16x8, 8x)."""

    block_out_channels: tuple[int, ...] = (16, 32, 64)  # one block per level; len-1 = number of 2x downsamples
    layers_per_block: int = 1  # resnets per encoder block (decoder gets one more)
    latent_channels: int = 4  # SD-style 4-channel latent
    norm_num_groups: int = 8  # GroupNorm groups (must divide every block width)
    steps: int = 800  # optimisation steps
    batch_size: int = 16  # crops per step
    lr: float = 1e-3  # AdamW peak learning rate (cosine decay to 10 %)
    warmup: int = 50  # linear warmup steps
    kl_weight: float = 1e-4  # weight of the mean per-element KL to N(0, 1)
    edge_weight: float = 0.5  # weight of the L1 loss on horizontal/vertical image gradients (sharper edges)


@dataclass
class TextConfig:
    """Small CLIP text encoder trained jointly with the UNet."""

    hidden_size: int = 128  # width = UNet cross_attention_dim
    intermediate_size: int = 256  # MLP width
    num_hidden_layers: int = 2  # transformer layers
    num_attention_heads: int = 4  # heads
    max_position_embeddings: int = 77  # CLIP context length


@dataclass
class UNetConfig:
    """UNet2DConditionModel on 16x16x4 latents, attention only at 8x8 and 4x4."""

    block_out_channels: tuple[int, ...] = (64, 128, 128)  # widths at 16x16, 8x8, 4x4
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    layers_per_block: int = 1  # resnets per down block (up blocks get one more)
    attention_head_dim: int = 4  # diffusers' legacy name: number of attention heads
    steps: int = 4500  # optimisation steps (the budget of the whole pretrain: ~62 min here)
    batch_size: int = 32  # latents per step
    lr: float = 3e-4  # AdamW peak learning rate (cosine decay to 10 %)
    warmup: int = 200  # linear warmup steps
    weight_decay: float = 0.01  # AdamW weight decay
    ema_decay: float = 0.999  # EMA of UNet and text encoder weights (exported); warmed up as (1+n)/(10+n)
    cond_dropout: float = 0.1  # share of empty captions (unconditional branch for classifier-free guidance)
    min_snr_gamma: float = 5.0  # Min-SNR loss weighting min(SNR, gamma)/SNR for epsilon prediction (0 = off)
    grad_clip: float = 1.0  # gradient norm clip


@dataclass
class TinyConfig:
    """Everything ``pretrain`` needs besides paths."""

    vae: VAEConfig = field(default_factory=VAEConfig)  # autoencoder
    text: TextConfig = field(default_factory=TextConfig)  # text encoder
    unet: UNetConfig = field(default_factory=UNetConfig)  # denoiser
    seed: int = 0  # seeds init, batches, noise
    threads: int = 1  # torch.set_num_threads (1 beats 2 on a 2-core machine shared with other jobs)
    checkpoint_every_s: float = 180.0  # seconds between checkpoints
    max_photos: int | None = None  # keep an evenly spaced subset of photos (tests)
    crop_size: int = CROP_SIZE  # side of the aligned training crops in pixels (= the model's image resolution)
    datasets: tuple[str, ...] = DATASETS  # identity-folder datasets under the faces root that are trained on


def _v2() -> TinyConfig:
    """128x128 faces through an 8x VAE (the UNet still sees 16x16 latents), trained on every non-eval photo."""
    return TinyConfig(
        vae=VAEConfig(block_out_channels=(16, 32, 64, 64), latent_channels=8, steps=1500, batch_size=8),
        unet=replace(UNetConfig(), steps=5500),
        crop_size=128,
        datasets=ALL_DATASETS,
    )


# Named architectures of the tiny base (``difflora tiny pretrain --preset``); v1 is the one bundled until v2 wins.
TINY_PRESETS = {"v1": TinyConfig, "v2": _v2}


def tiny_preset(name: str) -> TinyConfig:
    """A fresh config of the named preset (KeyError names the known ones)."""
    if name not in TINY_PRESETS:
        raise KeyError(f"unknown tiny preset {name!r} (known: {', '.join(TINY_PRESETS)})")
    return TINY_PRESETS[name]()


# SD 1.x noise schedule
SCHEDULER_KW = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}


def build_vae(cfg: VAEConfig, sample_size: int = CROP_SIZE):
    from diffusers import AutoencoderKL

    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=sample_size,
        scaling_factor=1.0,
        mid_block_add_attention=False,
    )


def build_text_encoder(cfg: TextConfig, vocab_size: int, bos_id: int, eos_id: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    conf = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        projection_dim=cfg.hidden_size,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    return CLIPTextModel(conf)


def build_unet(cfg: UNetConfig, latent_channels: int, cross_attention_dim: int, sample_size: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=tuple(cfg.down_block_types),
        up_block_types=tuple(cfg.up_block_types),
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.attention_head_dim,
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=32,
    )


@torch.no_grad()
def fold_latent_normalisation(vae, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Make the VAE emit per-channel normalised latents, so scaling_factor 1.0 works in stock pipelines.

    encode: mean' = (mean - m) / s, logvar' = logvar - 2 log s   (quant_conv, 1x1)
    decode: z = s z' + m folded into post_quant_conv (1x1):  W' = W s,  b' = b + W m
    """
    c = vae.config.latent_channels
    m = mean.to(torch.float32)  # (C,)
    s = std.to(torch.float32)  # (C,)
    qw, qb = vae.quant_conv.weight, vae.quant_conv.bias  # (2C, 2C, 1, 1), (2C,)
    qw[:c] /= s[:, None, None, None]
    qb[:c] = (qb[:c] - m) / s
    qb[c:] -= 2 * torch.log(s)
    pw, pb = vae.post_quant_conv.weight, vae.post_quant_conv.bias  # (C, C, 1, 1), (C,)
    pb += (pw[:, :, 0, 0] * m[None, :]).sum(1)  # uses the old W
    pw *= s[None, :, None, None]
    vae.register_to_config(scaling_factor=1.0)
