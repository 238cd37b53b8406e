"""Guards for the folders ``difflora tiny`` writes: never clear or replace anything the command did not write."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# everything pretrain writes into its work folder (checkpoints, their temp files, logs, the tokenizer, the VAE)
WORK_ENTRIES = (
    "config.json",
    "metrics.jsonl",
    "tokenizer",
    "vae",
    "vae.tmp",
    "vae_ckpt.safetensors",
    "vae_ckpt.safetensors.tmp",
    "latents.safetensors",
    "latents.safetensors.tmp",
    "unet_ckpt.safetensors",
    "unet_ckpt.safetensors.tmp",
)


class FolderRefusedError(ValueError):
    """A folder the command would clear or replace holds something the command did not write."""


def _is_pretrain_config(path: Path) -> bool:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and all(isinstance(cfg.get(k), dict) for k in ("vae", "text", "unet"))


def is_work_dir(work: Path) -> bool:
    """True for an empty folder or one holding a tiny pretrain ``config.json``."""
    return work.is_dir() and (not any(work.iterdir()) or _is_pretrain_config(work / "config.json"))


def prepare_work_dir(work: str | Path, resume: bool) -> Path:
    """Create ``work``; without ``resume`` remove what an earlier pretrain wrote there (and nothing else).

    Raises FolderRefusedError for a file, or a non-empty folder that is not a pretrain work folder.
    """
    work = Path(work)
    if work.exists() and not work.is_dir():
        raise FolderRefusedError(f"--work {work} exists and is not a folder")
    if work.is_dir() and not is_work_dir(work):
        raise FolderRefusedError(
            f"--work {work} is not empty and is not a tiny pretrain work folder (no pretrain config.json); "
            "use a new or empty folder"
        )
    if work.is_dir() and not resume:
        for name in WORK_ENTRIES:
            p = work / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
    work.mkdir(parents=True, exist_ok=True)
    return work


def is_tiny_export(out: Path) -> bool:
    """True for a diffusers folder written by the tiny export (``model_index.json`` and ``training.json``)."""
    if not (out / "model_index.json").is_file():
        return False
    try:
        train = json.loads((out / "training.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(train, dict) and "unet_steps" in train


def check_out_dir(out: str | Path) -> Path:
    """``out`` if the export may (re)place it: absent, an empty folder, or an earlier tiny export.

    Raises FolderRefusedError otherwise (a file, or a folder holding anything else).
    """
    out = Path(out)
    if out.is_symlink() and not out.exists():
        raise FolderRefusedError(f"--out {out} is a broken symbolic link")
    if not out.exists():
        return out
    if not out.is_dir():
        raise FolderRefusedError(f"--out {out} exists and is not a folder")
    if any(out.iterdir()) and not is_tiny_export(out):
        raise FolderRefusedError(
            f"--out {out} is not empty and is not a model folder written by difflora tiny "
            "(model_index.json + training.json); use a new or empty folder"
        )
    return out
