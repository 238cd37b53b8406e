"""Base-model presets: ``tiny`` (bundled), ``sd15`` and ``sdxl`` (local path or hub id)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_BASE = REPO_ROOT / "assets" / "tiny" / "base"


# Stable Diffusion 1.5's public UNet config (unet/config.json): builds the real-size UNet with random weights
SD15_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}


class ModelNotFoundError(FileNotFoundError):
    """A preset's weights are not available locally (and no hub access was allowed)."""


@dataclass(frozen=True)
class BasePreset:
    """How to load one base model."""

    name: str  # registry key
    source: str  # local folder, or a hub id
    family: str  # "sd1" (StableDiffusionPipeline) or "sdxl" (StableDiffusionXLPipeline)
    resolution: int  # native image side in pixels
    gpu_dtype: str  # dtype on CUDA ("float16"); CPU always uses float32
    local_only: bool  # never contact a hub (the bundled model)
    env_var: str | None = None  # environment variable that overrides ``source`` with a local path
    default_prompt: str = "a photo of a person"  # prompt that suits the model's training captions


PRESETS: dict[str, BasePreset] = {
    "tiny": BasePreset("tiny", str(TINY_BASE), "sd1", 64, "float32", True, "DIFFLORA_TINY_BASE"),
    "sd15": BasePreset(
        "sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd1", 512, "float16", False, "DIFFLORA_SD15_PATH"
    ),
    "sdxl": BasePreset(
        "sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "sdxl", 1024, "float16", False, "DIFFLORA_SDXL_PATH"
    ),
}


def get_preset(name: str) -> BasePreset:
    """The preset called ``name`` (ValueError listing the known ones otherwise)."""
    if name not in PRESETS:
        raise ValueError(f"unknown base model preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def resolve_source(preset: BasePreset) -> str:
    """Local folder or hub id for a preset, honouring its environment override."""
    if preset.env_var and os.environ.get(preset.env_var):
        return os.environ[preset.env_var]
    return preset.source


def _looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or os.sep in source and Path(source).expanduser().exists()


def _family_of(path: Path) -> str:
    import json

    idx = path / "model_index.json"
    if idx.is_file() and "XL" in json.loads(idx.read_text()).get("_class_name", ""):
        return "sdxl"
    return "sd1"


def load_pipeline(preset_or_path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """A diffusers pipeline for a preset name or a local diffusers folder.

    ``dtype`` defaults to the preset's GPU dtype on CUDA and float32 elsewhere. A missing local folder raises
    ModelNotFoundError naming the path; hub ids are only tried for non-local presets.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if preset_or_path in PRESETS:
        preset = PRESETS[preset_or_path]
        source, family, local_only = resolve_source(preset), preset.family, preset.local_only
        gpu_dtype = getattr(torch, preset.gpu_dtype)
    else:
        source, family, local_only, gpu_dtype = preset_or_path, None, True, torch.float16
        if not Path(source).expanduser().is_dir():
            raise ModelNotFoundError(f"no model folder at {source!r} (and not a preset: {', '.join(PRESETS)})")
    path = Path(source).expanduser()
    is_local = path.is_dir() or local_only or _looks_local(source)
    if is_local and not (path / "model_index.json").is_file():
        hint = " (build it with `make tiny-assets`)" if preset_or_path == "tiny" else ""
        raise ModelNotFoundError(f"no diffusers model_index.json in {path}{hint}")
    if family is None:
        family = _family_of(path)
    if dtype is None:
        dtype = gpu_dtype if torch.device(device).type == "cuda" else torch.float32
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    kw = {"dtype": dtype, "local_files_only": is_local, "use_safetensors": True}  # never unpickle a .bin
    if family == "sd1":
        kw.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = cls.from_pretrained(str(path) if is_local else source, **kw)
    except OSError as e:
        raise ModelNotFoundError(f"cannot load base model from {source!r}: {e}") from e
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
