"""Checkpoint files (safetensors + JSON only, written atomically) shared by training and inference.

A checkpoint directory holds::

    config.json          HypernetConfig (+ format version)
    model.safetensors    HypernetModel state (weights, token layout, token and latent statistics)
    ema.safetensors      the EMA copy of the same state (used for inference)
    optimizer.safetensors, trainer_state.json   training only (see train.py)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from weights.safetensors_io import atomic_write_bytes, write_safetensors

from .checks import dumps
from .config import HypernetConfig

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
MODEL_NAME = "model.safetensors"
EMA_NAME = "ema.safetensors"


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_save_tensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    write_safetensors(path, tensors, metadata or {})


def save_config(cfg: HypernetConfig, directory: Path, extra: dict[str, Any] | None = None) -> None:
    payload = {"format_version": FORMAT_VERSION, **cfg.to_dict(), **(extra or {})}
    atomic_write_text(directory / CONFIG_NAME, dumps(payload, indent=2, sort_keys=True) + "\n")


def load_config(directory: str | Path) -> HypernetConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in hypernet checkpoint directory {str(directory)!r}")
    d = read_json(path)
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object (the hypernet config), got {type(d).__name__}")
    version = d.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported hypernet checkpoint format_version {version!r}")
    sections = {k: d[k] for k in ("autoencoder", "denoiser", "train") if k in d}
    try:
        return HypernetConfig.from_dict(sections)
    except (ValueError, TypeError) as e:  # TypeError: an unknown field, or a section that is not an object
        raise ValueError(f"{path}: invalid hypernet config ({e})") from None


def read_json(path: Path) -> Any:
    """A checkpoint JSON file's content; a ValueError naming the file if it is not UTF-8 JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not valid JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def state_to_tensors(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def load_state(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"hypernet weights file not found: {str(path)!r}")
    try:
        return load_file(str(path), device=str(device))
    except SafetensorError as e:  # say why (a pickle, truncated, ...) rather than safetensors' header message
        from weights.safetensors_io import read_header

        read_header(path, allow_int=True)
        raise ValueError(f"{str(path)!r}: not a readable safetensors file ({e})") from None
