"""Checkpoint files (safetensors + JSON only, written atomically) shared by training and inference.

A checkpoint directory holds::

    config.json          HypernetConfig's autoencoder, denoiser and train sections (+ format version)
    sampling.json        its sampling section (DDIM steps, CFG scale, samples): rewritten by `hypernet tune`
    model.safetensors    HypernetModel state (weights, token layout, token and latent statistics)
    ema.safetensors      the EMA copy of the same state (used for inference)
    optimizer.safetensors, trainer_state.json   training only (see train.py)
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from weights.atomic import atomic_write_text
from weights.safetensors_io import write_safetensors

from .config import HypernetConfig, SamplingConfig
from .strict_json import dumps

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
SAMPLING_NAME = "sampling.json"
# train-section fields of checkpoints written before sampling.json -> their SamplingConfig field
LEGACY_SAMPLING = {"sample_steps": "steps", "cfg_scale": "cfg_scale", "sample_count": "samples"}
MODEL_NAME = "model.safetensors"
EMA_NAME = "ema.safetensors"


def atomic_save_tensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    write_safetensors(path, tensors, metadata or {})


def save_config(cfg: HypernetConfig, directory: Path, extra: dict[str, Any] | None = None) -> None:
    """``config.json`` (every section but sampling, plus ``extra`` keys) and ``sampling.json``."""
    d = cfg.to_dict()
    d.pop("sampling")
    payload = {"format_version": FORMAT_VERSION, **d, **(extra or {})}
    atomic_write_text(directory / CONFIG_NAME, dumps(payload, indent=2, sort_keys=True) + "\n")
    save_sampling(cfg.sampling, directory)


def save_sampling(sampling: SamplingConfig, directory: Path) -> None:
    """``sampling.json``: the predictor's default sampling settings (the only file `hypernet tune` rewrites)."""
    atomic_write_text(directory / SAMPLING_NAME, dumps(asdict(sampling), indent=2, sort_keys=True) + "\n")


def _sampling_section(directory: Path, train: dict) -> dict:
    """The sampling section: ``sampling.json``, else the legacy ``train.sample_*`` fields (popped from ``train``)."""
    legacy = {new: train.pop(old) for old, new in LEGACY_SAMPLING.items() if old in train}
    path = directory / SAMPLING_NAME
    if not path.is_file():
        return legacy
    if legacy:  # both: which one the predictor would use is not clear
        keys = ", ".join(f"train.{k}" for k in LEGACY_SAMPLING if LEGACY_SAMPLING[k] in legacy)
        raise ValueError(
            f"{directory / CONFIG_NAME}: {keys}: sampling settings live in {SAMPLING_NAME} now; remove them here"
        )
    d = read_json(path)
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object (the sampling settings), got {type(d).__name__}")
    return d


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
    if isinstance(sections.get("train"), dict):
        sections["train"] = dict(sections["train"])
        sections["sampling"] = _sampling_section(Path(directory), sections["train"])
    try:
        return HypernetConfig.from_dict(sections)
    except (ValueError, TypeError) as e:  # TypeError: an unknown field, or a section that is not an object
        where = Path(directory) / SAMPLING_NAME if str(e).startswith("sampling") else path
        raise ValueError(f"{where}: invalid hypernet config ({e})") from None


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
