"""peft adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors`` (as ``PeftModel.save_pretrained``).

Keys are ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` (+ ``.lora_magnitude_vector`` for
DoRA); the config is a ``LoraConfig`` with the exact module paths as ``target_modules``. Such a folder loads with
``PeftModel.from_pretrained(unet, folder)``; the same state dict (prefix stripped) loads with
``set_peft_model_state_dict`` after ``unet.add_adapter(LoraConfig(**config))``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..adapter import Adapter
from ..atomic import atomic_write_bytes
from ..convert import BaseWeights, ConversionReport
from ..errors import AdapterFileError
from ..safetensors_io import read_safetensors, write_safetensors
from ._lora import build_lora_adapter, export_lora, floats_only
from .diffusers import group_lora_keys
from .metadata import ExportInfo, for_adapter, training_metadata, with_hashes

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model"


def peft_config_dict(rank: int, alpha: float, targets: list[str], dora: bool, base_model: str = "") -> dict:
    """An ``adapter_config.json`` payload peft's ``LoraConfig.from_pretrained`` accepts."""
    return {
        "peft_type": "LORA",
        "task_type": None,
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(targets),
        "use_dora": dora,
        "use_rslora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "inference_mode": True,
        "base_model_name_or_path": base_model or None,
        "revision": None,
    }


def save_peft(
    adapter: Adapter,
    folder: str | os.PathLike,
    *,
    rank: int | None = None,
    base: BaseWeights = None,
    info: ExportInfo | None = None,
) -> ConversionReport:
    """Write a peft adapter folder (each file atomically). Non-LoRA methods go through the SVD conversion; the
    weights file's metadata carries the ``ss_*`` / ``modelspec.*`` keys of ``info``."""
    ex = export_lora(adapter, rank, base, fmt="peft", bake_scale=False)
    sd = {}
    for lay in ex.layers:
        k = f"{PREFIX}.{lay.info.name}"
        sd[f"{k}.lora_A.weight"] = lay.down
        sd[f"{k}.lora_B.weight"] = lay.up
        if lay.magnitude is not None:
            sd[f"{k}.lora_magnitude_vector"] = lay.magnitude
    cfg = peft_config_dict(ex.rank, ex.alpha, [lay.info.name for lay in ex.layers], ex.dora, adapter.spec.base_model)
    d = Path(folder)
    if d.exists() and not d.is_dir():
        raise ValueError(f"{d} exists and is not a folder")
    meta = training_metadata(for_adapter(info, adapter.spec.base_model), rank=ex.rank, alpha=ex.alpha)
    write_safetensors(d / WEIGHTS_NAME, sd, with_hashes(sd, {"format": "pt", **meta}))
    atomic_write_bytes(d / CONFIG_NAME, json.dumps(cfg, indent=2, sort_keys=True).encode())
    return ex.report


def load_peft(folder: str | os.PathLike, *, base_model: str = "") -> Adapter:
    """An Adapter (lora or dora) from a peft LoRA folder."""
    d = Path(folder)
    cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise AdapterFileError(f"no {CONFIG_NAME} in the folder", "missing", str(d))
    if not w_path.is_file():
        if (d / "adapter_model.bin").is_file():
            raise AdapterFileError(
                "only a pickled adapter_model.bin is present; refusing to unpickle", "pickle", str(d)
            )
        raise AdapterFileError(f"no {WEIGHTS_NAME} in the folder", "missing", str(d))
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFileError(f"{CONFIG_NAME} is not valid JSON ({e})", "metadata", str(d)) from None
    if not isinstance(cfg, dict) or cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterFileError(
            f"only LoRA peft adapters are supported, got {cfg.get('peft_type')!r}", "unknown_method", str(d)
        )
    if cfg.get("use_rslora"):
        raise AdapterFileError("rsLoRA (use_rslora) adapters are not supported", "unknown_method", str(d))
    sd, _ = read_safetensors(w_path)
    floats_only(sd, str(w_path))
    pre = PREFIX + "."
    sd = {k[len(pre) :] if k.startswith(pre) else k: v for k, v in sd.items()}
    entries, alphas = group_lora_keys(sd, prefix="", path=str(w_path))
    return build_lora_adapter(
        entries,
        alphas=alphas,
        default_alpha=cfg.get("lora_alpha"),
        alpha_pattern=cfg.get("alpha_pattern") or {},
        base_model=base_model or (cfg.get("base_model_name_or_path") or ""),
        path=str(d),
    )


__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "load_peft", "peft_config_dict", "save_peft"]
