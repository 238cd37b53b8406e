"""kohya-ss / A1111 LoRA files (docs/weights.md §2b, 2d).

Keys: ``lora_unet_<module path with '.'→'_'>.lora_down.weight`` (r, n[, kh, kw]), ``.lora_up.weight``
(m, r[, 1, 1]) and ``.alpha`` (0-d); ΔW = multiplier·(alpha/r)·up·down. SD 1.5 files use diffusers' UNet
paths; SDXL files use the sgm UNet's block names (``input_blocks.4.1`` = ``down_blocks.1.attentions.0`` for
layers_per_block 2, ``middle_block.1``, ``output_blocks.N.{0,1,2}``) with resnet internals renamed
(``conv1`` → ``in_layers.2``, ``conv2`` → ``out_layers.3``, ``time_emb_proj`` → ``emb_layers.1``,
``conv_shortcut`` → ``skip_connection``). Metadata: ``ss_*`` (sd-scripts) and SAI ``modelspec.*``.
Non-LoRA methods (DoRA included: diffusers drops kohya ``dora_scale``) go through the SVD conversion.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import replace

import torch
from torch import Tensor

from ..adapter import Adapter
from ..convert import BaseWeights, ConversionReport
from ..errors import AdapterFileError
from ..safetensors_io import read_safetensors, write_safetensors
from ._lora import build_lora_adapter, export_lora, floats_only
from .metadata import ARCHS, ExportInfo, for_adapter, training_metadata, with_hashes

_RESNET_TO_SGM = {
    "conv1": "in_layers.2",
    "norm1": "in_layers.0",
    "conv2": "out_layers.3",
    "norm2": "out_layers.0",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_SGM_TO_RESNET = {v: k for k, v in _RESNET_TO_SGM.items()}
# diffusers-path words containing '_' (longest first), to undo '.'→'_' when no model is given
_WORDS = sorted(
    """down_blocks up_blocks mid_block transformer_blocks to_q to_k to_v to_out proj_in proj_out time_emb_proj
    conv_shortcut conv_in conv_out conv_norm_out time_embedding linear_1 linear_2 add_embedding add_k_proj add_v_proj
    add_q_proj to_add_out input_blocks middle_block output_blocks in_layers out_layers emb_layers skip_connection
    time_embed label_emb""".split(),
    key=lambda w: -w.count("_"),
)


def to_sgm(name: str, layers_per_block: int = 2) -> str:
    """diffusers UNet module path -> sgm (SDXL original) path."""
    lpb = layers_per_block

    def resnet_rest(rest: str) -> str:
        head, _, tail = rest.partition(".")
        return ".".join(x for x in (_RESNET_TO_SGM.get(head, head), tail) if x)

    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)$", name)
    if m:
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "downsamplers":
            return f"input_blocks.{1 + b * (lpb + 1) + lpb}.0.{rest.replace('conv', 'op', 1)}"
        n = 1 + b * (lpb + 1) + j
        return f"input_blocks.{n}.0.{resnet_rest(rest)}" if kind == "resnets" else f"input_blocks.{n}.1.{rest}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", name)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{0 if j == 0 else 2}.{resnet_rest(rest)}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)$", name)
    if m:
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "upsamplers":
            return f"output_blocks.{b * (lpb + 1) + lpb}.2.{rest}"
        n = b * (lpb + 1) + j
        return f"output_blocks.{n}.0.{resnet_rest(rest)}" if kind == "resnets" else f"output_blocks.{n}.1.{rest}"
    return name  # conv_in, time_embedding, ... keep diffusers spelling


def from_sgm(name: str, layers_per_block: int = 2) -> str:
    """Inverse of :func:`to_sgm`."""
    lpb = layers_per_block

    def resnet_rest(rest: str) -> str:
        for sgm, diff in _SGM_TO_RESNET.items():
            if rest == sgm or rest.startswith(sgm + "."):
                return diff + rest[len(sgm) :]
        return rest

    m = re.match(r"input_blocks\.(\d+)\.(\d+)\.(.+)$", name)
    if m:
        n, inner, rest = int(m[1]), int(m[2]), m[3]
        b, j = (n - 1) // (lpb + 1), (n - 1) % (lpb + 1)
        if j == lpb:
            return f"down_blocks.{b}.downsamplers.0.{rest.replace('op', 'conv', 1)}"
        return (
            f"down_blocks.{b}.resnets.{j}.{resnet_rest(rest)}"
            if inner == 0
            else f"down_blocks.{b}.attentions.{j}.{rest}"
        )
    m = re.match(r"middle_block\.(\d+)\.(.+)$", name)
    if m:
        i, rest = int(m[1]), m[2]
        return (
            f"mid_block.attentions.0.{rest}"
            if i == 1
            else f"mid_block.resnets.{0 if i == 0 else 1}.{resnet_rest(rest)}"
        )
    m = re.match(r"output_blocks\.(\d+)\.(\d+)\.(.+)$", name)
    if m:
        n, inner, rest = int(m[1]), int(m[2]), m[3]
        b, j = n // (lpb + 1), n % (lpb + 1)
        if inner == 2:
            return f"up_blocks.{b}.upsamplers.0.{rest}"
        return (
            f"up_blocks.{b}.resnets.{j}.{resnet_rest(rest)}" if inner == 0 else f"up_blocks.{b}.attentions.{j}.{rest}"
        )
    return name


def _dedot(flat: str) -> str:
    """Undo '.'→'_' using the vocabulary of diffusers/sgm path words."""
    s = flat.replace("_", ".")
    for w in _WORDS:
        s = re.sub(rf"(?<![A-Za-z0-9_]){re.escape(w.replace('_', '.'))}(?![A-Za-z_])", w, s)
    return s


def to_kohya(
    adapter: Adapter,
    *,
    arch: str = "sd15",
    layers_per_block: int = 2,
    rank: int | None = None,
    base: BaseWeights = None,
    title: str = "",
    info: ExportInfo | None = None,
) -> tuple[dict[str, Tensor], dict[str, str], ConversionReport]:
    """``(state_dict, metadata, report)`` in kohya layout for ``arch`` "sd15" or "sdxl"; the metadata carries the
    ``ss_*`` / ``modelspec.*`` keys of ``info`` (:mod:`weights.formats.metadata`)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    if adapter.spec.component != "unet":
        raise ValueError(f"only unet adapters can be written as kohya files, got component {adapter.spec.component!r}")
    ex = export_lora(adapter, rank, base, fmt="kohya", bake_scale=False)
    sd: dict[str, Tensor] = {}
    for lay in ex.layers:
        path = to_sgm(lay.info.name, layers_per_block) if arch == "sdxl" else lay.info.name
        k = "lora_unet_" + path.replace(".", "_")
        sd[f"{k}.lora_down.weight"] = lay.down
        sd[f"{k}.lora_up.weight"] = lay.up
        sd[f"{k}.alpha"] = torch.tensor(ex.alpha, dtype=lay.down.dtype)
    info = for_adapter(info, adapter.spec.base_model)
    info = replace(info, arch=arch, title=title or info.title)
    meta = with_hashes(sd, training_metadata(info, rank=ex.rank, alpha=ex.alpha))
    return sd, meta, ex.report


def save_kohya(adapter: Adapter, path: str | os.PathLike, **kw) -> ConversionReport:
    sd, meta, report = to_kohya(adapter, **kw)
    write_safetensors(path, sd, meta)
    return report


def from_kohya(
    sd: dict[str, Tensor],
    metadata: dict[str, str] | None = None,
    *,
    module_names: Iterable[str] | None = None,
    layers_per_block: int = 2,
    base_model: str = "",
    path: str | None = None,
) -> Adapter:
    """An Adapter (lora) from a kohya state dict. ``module_names`` (e.g. ``[n for n, _ in unet.named_modules()]``)
    resolves names exactly; without it the path words are restored from a vocabulary."""
    floats_only(sd, path)
    meta = metadata or {}
    sgm = meta.get("ss_base_model_version", "").startswith("sdxl") or any(
        w in k for k in sd for w in ("input_blocks", "middle_block", "output_blocks")
    )
    lookup = None
    if module_names is not None:
        names = list(module_names)
        lookup = {(to_sgm(n, layers_per_block) if sgm else n).replace(".", "_"): n for n in names}
    entries: dict[str, dict[str, Tensor]] = {}
    alphas: dict[str, float] = {}
    for key, t in sd.items():
        if not key.startswith("lora_unet_"):
            what = "text-encoder" if key.startswith("lora_te") else "non-UNet"
            raise AdapterFileError(f"{what} key {key!r}: only UNet LoRA is supported", "keys", path)
        flat, _, role = key[len("lora_unet_") :].partition(".")
        if lookup is not None:
            if flat not in lookup:
                raise AdapterFileError(f"key {key!r} names no module of the model (wrong base model?)", "keys", path)
            name = lookup[flat]
        else:
            name = _dedot(flat)
            name = from_sgm(name, layers_per_block) if sgm else name
        if role == "lora_down.weight":
            entries.setdefault(name, {})["down"] = t
        elif role == "lora_up.weight":
            entries.setdefault(name, {})["up"] = t
        elif role == "alpha":
            if t.numel() != 1:
                raise AdapterFileError(f"alpha of {key!r} must be a scalar", "shape", path)
            alphas[name] = float(t.float().reshape(-1)[0])
        elif role == "dora_scale":
            raise AdapterFileError(
                f"kohya DoRA key {key!r} is not supported (use the diffusers/peft format)", "keys", path
            )
        else:
            raise AdapterFileError(f"unsupported kohya key {key!r} (LyCORIS LoHa/LoKr?)", "keys", path)
    default_alpha = None
    if "ss_network_alpha" in meta:
        try:
            default_alpha = float(meta["ss_network_alpha"])
        except ValueError:
            raise AdapterFileError("metadata ss_network_alpha is not a number", "metadata", path) from None
    # kohya: missing per-module alpha means alpha = rank (scale 1) unless ss_network_alpha says otherwise
    for name, e in entries.items():
        if name not in alphas and "down" in e:
            alphas[name] = default_alpha if default_alpha is not None else float(e["down"].shape[0])
    return build_lora_adapter(entries, alphas=alphas, base_model=base_model, component="unet", path=path)


def load_kohya(path: str | os.PathLike, **kw) -> Adapter:
    sd, meta = read_safetensors(path)
    return from_kohya(sd, meta, path=str(path), **kw)


def is_kohya_keys(keys) -> bool:
    keys = list(keys)
    return bool(keys) and all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys)


__all__ = ["ARCHS", "from_kohya", "from_sgm", "load_kohya", "save_kohya", "to_kohya", "to_sgm"]
