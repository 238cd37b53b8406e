"""diffusers / peft LoRA state dicts (docs/weights.md §2a, 2c, 2d).

Written: ``unet.<module path>.lora_A.weight`` (r, n[, kh, kw]) and ``.lora_B.weight`` (m, r[, 1, 1]), DoRA
``.lora_magnitude_vector``; file metadata ``{"format": "pt", "lora_adapter_metadata": JSON of LoraConfig kwargs
prefixed by the component ("unet.r", "unet.lora_alpha", ...)}`` exactly as diffusers' ``write_lora_layers``.
By default the scale alpha/r is baked into B (alpha = r) so an in-memory state dict, which carries no
metadata, loads with the right scale too. Read: peft keys, "new diffusers" ``lora.down/up``, the
``lora_linear_layer`` and old attention-processor (``processor.to_q_lora``) spellings, per-layer ``.alpha``.
"""

from __future__ import annotations

import json
import os
import re

from torch import Tensor

from ..adapter import Adapter
from ..convert import BaseWeights, ConversionReport
from ..errors import AdapterFileError
from ..safetensors_io import read_safetensors, write_safetensors
from ._lora import build_lora_adapter, export_lora, floats_only
from .metadata import ExportInfo, for_adapter, training_metadata, with_hashes

METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY

_SUFFIXES = [  # (regex on the key after the component prefix, role)
    (re.compile(r"^(.+)\.lora_A(?:\.default)?\.weight$"), "down"),
    (re.compile(r"^(.+)\.lora_B(?:\.default)?\.weight$"), "up"),
    (re.compile(r"^(.+)\.lora\.down\.weight$"), "down"),
    (re.compile(r"^(.+)\.lora\.up\.weight$"), "up"),
    (re.compile(r"^(.+)\.lora_linear_layer\.down\.weight$"), "down"),
    (re.compile(r"^(.+)\.lora_linear_layer\.up\.weight$"), "up"),
    (re.compile(r"^(.+)\.lora_magnitude_vector(?:\.default)?(?:\.weight)?$"), "magnitude"),
    (re.compile(r"^(.+)\.alpha$"), "alpha"),
]
_PROCESSOR = re.compile(r"^(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


def to_diffusers(
    adapter: Adapter,
    *,
    prefix: str = "unet",
    rank: int | None = None,
    base: BaseWeights = None,
    bake_scale: bool = True,
    info: ExportInfo | None = None,
) -> tuple[dict[str, Tensor], dict[str, str], ConversionReport]:
    """``(state_dict, safetensors metadata, conversion report)`` in diffusers/peft layout.

    Non-LoRA methods are converted by truncated SVD (``rank``, ``base`` for multiplicative methods); DoRA is
    written natively (``lora_magnitude_vector``) unless a different ``rank`` is asked for. The metadata also
    carries the ``ss_*`` / ``modelspec.*`` keys of ``info`` (:mod:`weights.formats.metadata`).
    """
    ex = export_lora(adapter, rank, base, fmt="diffusers", bake_scale=bake_scale)
    pre = f"{prefix}." if prefix else ""
    sd: dict[str, Tensor] = {}
    for lay in ex.layers:
        k = pre + lay.info.name
        sd[f"{k}.lora_A.weight"] = lay.down
        sd[f"{k}.lora_B.weight"] = lay.up
        if lay.magnitude is not None:
            sd[f"{k}.lora_magnitude_vector"] = lay.magnitude
    cfg = {
        "r": ex.rank,
        "lora_alpha": ex.alpha,
        "target_modules": sorted(lay.info.name for lay in ex.layers),
        "use_dora": ex.dora,
        "lora_dropout": 0.0,
        "bias": "none",
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    packed = {f"{prefix}.{k}" if prefix else k: v for k, v in cfg.items()}
    meta = {"format": "pt", METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}
    meta |= training_metadata(for_adapter(info, adapter.spec.base_model), rank=ex.rank, alpha=ex.alpha)
    meta = with_hashes(sd, meta)
    return sd, meta, ex.report


def save_diffusers(adapter: Adapter, path: str | os.PathLike, **kw) -> ConversionReport:
    """Write a diffusers LoRA file (e.g. ``pytorch_lora_weights.safetensors``) atomically."""
    sd, meta, report = to_diffusers(adapter, **kw)
    write_safetensors(path, sd, meta)
    return report


def parse_metadata(meta: dict[str, str] | None, prefix: str, path: str | None = None) -> dict:
    """The component's LoraConfig kwargs from diffusers' ``lora_adapter_metadata`` ({} if absent)."""
    if not meta or METADATA_KEY not in meta:
        return {}
    try:
        d = json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError:
        raise AdapterFileError(f"metadata {METADATA_KEY!r} is not valid JSON", "metadata", path) from None
    if not isinstance(d, dict):
        raise AdapterFileError(f"metadata {METADATA_KEY!r} must be a JSON object", "metadata", path)
    pre = f"{prefix}."
    return {k[len(pre) :]: v for k, v in d.items() if k.startswith(pre)} if prefix else d


def group_lora_keys(
    sd: dict[str, Tensor], prefix: str = "unet", path: str | None = None
) -> tuple[dict[str, dict[str, Tensor]], dict[str, float]]:
    """``({module path: {"down","up","magnitude"}}, {module path: alpha})`` from diffusers/peft keys."""
    pre = f"{prefix}."
    has_prefix = any(k.startswith(pre) for k in sd)
    entries: dict[str, dict[str, Tensor]] = {}
    alphas: dict[str, float] = {}
    for key, t in sd.items():
        if has_prefix:
            if not key.startswith(pre):
                comp = key.split(".", 1)[0]
                raise AdapterFileError(
                    f"key {key!r} belongs to component {comp!r}; only {prefix!r} LoRA is supported", "keys", path
                )
            key = key[len(pre) :]
        m = _PROCESSOR.match(key)
        if m:
            name = f"{m[1]}.{'to_out.0' if m[2] == 'to_out' else m[2]}"
            entries.setdefault(name, {})[m[3]] = t
            continue
        for rx, role in _SUFFIXES:
            m = rx.match(key)
            if m:
                if role == "alpha":
                    alphas[m[1]] = float(t.float().reshape(-1)[0]) if t.numel() == 1 else float("nan")
                else:
                    entries.setdefault(m[1], {})[role] = t
                break
        else:
            raise AdapterFileError(f"unrecognised LoRA key {key!r}", "keys", path)
    for name in list(alphas):
        if alphas[name] != alphas[name]:
            raise AdapterFileError(f"alpha of {name!r} must be a scalar", "shape", path)
    return entries, alphas


def from_diffusers(
    sd: dict[str, Tensor],
    metadata: dict[str, str] | None = None,
    *,
    prefix: str = "unet",
    base_model: str = "",
    path: str | None = None,
) -> Adapter:
    """An Adapter (lora or dora) from a diffusers/peft LoRA state dict and optional file metadata."""
    floats_only(sd, path)
    entries, alphas = group_lora_keys(sd, prefix, path)
    cfg = parse_metadata(metadata, prefix, path)
    return build_lora_adapter(
        entries,
        alphas=alphas,
        default_alpha=cfg.get("lora_alpha"),
        alpha_pattern=cfg.get("alpha_pattern") or {},
        base_model=base_model,
        component=prefix or "unet",
        path=path,
    )


def load_diffusers(path: str | os.PathLike, *, prefix: str = "unet", base_model: str = "") -> Adapter:
    sd, meta = read_safetensors(path)
    return from_diffusers(sd, meta, prefix=prefix, base_model=base_model, path=str(path))


def is_diffusers_keys(keys) -> bool:
    return any(".lora_A." in k or ".lora_B." in k or ".lora.down." in k or "_lora.down." in k for k in keys) or any(
        k.endswith("lora_A.weight") or k.endswith(".lora_linear_layer.down.weight") for k in keys
    )


__all__ = [
    "METADATA_KEY",
    "from_diffusers",
    "group_lora_keys",
    "load_diffusers",
    "parse_metadata",
    "save_diffusers",
    "to_diffusers",
]
