"""Sample grids from a tiny diffusers folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def generate(
    model: str | Path,
    prompt: str = "a photo of a person",
    n: int = 16,
    steps: int = 25,
    guidance: float = 3.0,
    seed: int = 0,
    pipe=None,
) -> list[Image.Image]:
    """``n`` images, image i from seed ``seed + i`` (fp32 on CPU)."""
    from pipeline_data.models import load_pipeline

    pipe = pipe or load_pipeline(str(model), device="cpu", dtype=torch.float32)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    with torch.no_grad():
        res = pipe([prompt] * n, num_inference_steps=steps, guidance_scale=guidance, generator=gens)
    return res.images


def grid(images: list[Image.Image], cols: int = 4, scale: int = 2) -> Image.Image:
    """Tile images into a grid, each upscaled ``scale``x (nearest, so pixels stay honest)."""
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    out = Image.new("RGB", (cols * w * scale, rows * h * scale), "white")
    for i, im in enumerate(images):
        out.paste(im.resize((w * scale, h * scale), Image.NEAREST), ((i % cols) * w * scale, (i // cols) * h * scale))
    return out


def sample_grid(
    model: str | Path,
    out: str | Path,
    prompt: str = "a photo of a person",
    steps: int = 25,
    guidance: float = 3.0,
    seed: int = 0,
) -> Path:
    """Render a 4x4 grid (seeds seed..seed+15) to ``out`` (PNG, written atomically)."""
    imgs = generate(model, prompt, 16, steps, guidance, seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    grid(imgs).save(tmp, format="PNG")
    os.replace(tmp, out)
    return out


def to_array(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB")) for im in images])
