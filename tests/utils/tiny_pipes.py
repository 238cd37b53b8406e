"""Tiny SD 1.5 / SDXL pipelines built from config (no hub, random seeded weights) for tests.

``tiny_sd15_pipe()`` and ``tiny_sdxl_pipe()`` return real diffusers pipelines with the same module
structure as the big models (down/mid/up blocks, transformer blocks with attn1/attn2, CLIP text
encoders), just narrow: UNet block_out_channels (32, 64), cross-attention width 32 (SDXL: 32 + 32).
``tiny_tokenizer(dir)`` writes a small byte-level BPE vocabulary and returns a ``CLIPTokenizer``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from pipeline_data.tiny.tokenizer import bytes_to_unicode

TEXT_DIM = 32  # hidden size of each tiny CLIP text encoder
VOCAB_SIZE = 1000  # text encoder vocabulary size (>= the tokenizer's vocabulary)


_MERGES = ["t h", "th e</w>", "a n", "an d</w>", "o f</w>", "p h", "ph o", "pho t", "phot o</w>", "o f"]


def tiny_tokenizer(directory: str | Path | None = None):
    """A ``CLIPTokenizer`` from a small vocab.json/merges.txt written to ``directory`` (a temp dir by default)."""
    from transformers import CLIPTokenizer

    d = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="tiny_tok_"))
    d.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    for m in _MERGES:
        tok = m.replace(" ", "")
        if tok not in tokens:
            tokens.append(tok)
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n")
    tok = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=77)
    tok.model_max_length = 77  # a tokenizer built from files otherwise has model_max_length = 1e30
    return tok


def _text_config(**kw):
    from transformers import CLIPTextConfig

    cfg = {
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
        "hidden_size": TEXT_DIM,
        "intermediate_size": 37,
        "layer_norm_eps": 1e-5,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "vocab_size": VOCAB_SIZE,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
    }
    cfg.update(kw)
    return CLIPTextConfig(**cfg)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=32,
    )


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def tiny_sd15_unet(seed: int = 0):
    """The tiny SD 1.5-style UNet alone (~1 M params)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def tiny_sd15_pipe(seed: int = 0):
    """A tiny ``StableDiffusionPipeline`` (fp32, CPU, eval mode, no safety checker)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    unet = tiny_sd15_unet(seed)
    torch.manual_seed(seed + 1)
    vae = _vae()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_text_config())
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_tokenizer(),
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_unet(seed: int = 0):
    """The tiny SDXL-style UNet (text_time added conditioning, linear projections, 2 transformer layers)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=TEXT_DIM + 6 * 8,  # pooled text (32) + 6 time ids x 8
        cross_attention_dim=2 * TEXT_DIM,  # both text encoders' hidden states, concatenated
        norm_num_groups=32,
    )


def tiny_sdxl_pipe(seed: int = 0):
    """A tiny ``StableDiffusionXLPipeline`` (fp32, CPU, two CLIP text encoders, no watermarker)."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = tiny_sdxl_unet(seed)
    torch.manual_seed(seed + 1)
    vae = _vae()
    torch.manual_seed(seed + 2)
    te1 = CLIPTextModel(_text_config())
    torch.manual_seed(seed + 3)
    te2 = CLIPTextModelWithProjection(_text_config(projection_dim=TEXT_DIM))
    tok = tiny_tokenizer()
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=tok,
        tokenizer_2=tok,
        scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipe(pipe, prompt: str = "a photo of sks person", seed: int = 0, steps: int = 2, size: int = 32):
    """Images as a float numpy array (N, H, W, 3) for a fixed seed."""
    gen = torch.Generator("cpu").manual_seed(seed)
    return pipe(
        prompt, num_inference_steps=steps, generator=gen, output_type="np", height=size, width=size, guidance_scale=5.0
    ).images
