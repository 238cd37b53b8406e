"""Safe adapter loading and saving: safetensors only, validated, typed errors, atomic writes, format detection.

``load_any(path, model=None)`` detects native / diffusers / kohya / peft, reads the file defensively
(weights.safetensors_io), rebuilds an :class:`Adapter` and validates it (method known, keys and shapes
consistent with the spec, finite floats, and — given a model — every layer present with the right shape).
Every problem surfaces as one :class:`AdapterFileError` (a ValueError) with a ``reason`` code.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from .adapter import SEP, SHARED, Adapter
from .convert import BaseWeights, ConversionReport
from .errors import AdapterFileError
from .formats import FORMATS
from .safetensors_io import read_header, read_safetensors

__all__ = ["detect_format", "export_info", "load_adapter", "load_any", "save_adapter", "validate_adapter"]


def detect_format(path: str | os.PathLike) -> str:
    """ "native" | "diffusers" | "kohya" | "peft", from the folder layout or the safetensors header only."""
    from .basis import FORMAT as BASIS_FORMAT
    from .formats.diffusers import is_diffusers_keys
    from .formats.kohya import is_kohya_keys
    from .formats.native import FORMAT_KEY, SPEC_KEY
    from .formats.peft import CONFIG_NAME

    p = Path(path)
    if p.is_dir():
        if (p / CONFIG_NAME).is_file():
            return "peft"
        raise AdapterFileError(f"folder has no {CONFIG_NAME} (not a peft adapter folder)", "format", str(p))
    if not p.exists():
        raise AdapterFileError("no such file", "missing", str(p))
    header, meta = read_header(p, allow_int=True)  # detection reads keys only; loaders check dtypes (LoLDU pivots)
    keys = list(header)
    if meta.get(FORMAT_KEY) == BASIS_FORMAT:
        raise AdapterFileError(
            "is an identity basis, not an adapter (weights.basis.load_basis; basis_to_lora gives one identity's)",
            "format",
            str(p),
        )
    if SPEC_KEY in meta:
        return "native"
    if keys and all(SEP in k for k in keys):
        raise AdapterFileError(f"native adapter tensors but no {SPEC_KEY!r} metadata", "metadata", str(p))
    if is_kohya_keys(keys):
        return "kohya"
    if is_diffusers_keys(keys):
        return "diffusers"
    if not keys:
        raise AdapterFileError("file holds no tensors", "keys", str(p))
    raise AdapterFileError(f"unrecognised adapter layout (first key {keys[0]!r})", "format", str(p))


def load_any(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    format: str | None = None,
    base_model: str = "",
    validate: bool = True,
) -> Adapter:
    """Load an adapter in any supported format; ``model`` (the UNet) resolves kohya names and is validated against."""
    fmt = format or detect_format(path)
    p = str(path)
    if fmt == "native":
        from .formats.native import load_native

        ad = load_native(p)
    elif fmt == "diffusers":
        from .formats.diffusers import load_diffusers

        ad = load_diffusers(p, base_model=base_model)
    elif fmt == "kohya":
        from .formats.kohya import load_kohya

        kw = {}
        if model is not None:
            kw["module_names"] = [n for n, _ in model.named_modules()]
            lpb = getattr(getattr(model, "config", None), "layers_per_block", None)
            if isinstance(lpb, int):
                kw["layers_per_block"] = lpb
        ad = load_kohya(p, base_model=base_model, **kw)
    elif fmt == "peft":
        from .formats.peft import load_peft

        ad = load_peft(p, base_model=base_model)
    else:
        raise ValueError(f"unknown adapter format {fmt!r}; valid: {', '.join(FORMATS)}")
    if validate:
        validate_adapter(ad, model, path=p)
    return ad


def load_adapter(path: str | os.PathLike, model: nn.Module | None = None, **kw) -> Adapter:
    """Alias of :func:`load_any`."""
    return load_any(path, model, **kw)


def validate_adapter(adapter: Adapter, model: nn.Module | None = None, *, path: str | None = None) -> None:
    """Check the adapter against its method and spec (and the model if given); AdapterFileError otherwise."""
    from .methods import get_method, method_config

    spec = adapter.spec
    try:
        method = get_method(spec.method)
    except ValueError as e:
        raise AdapterFileError(str(e), "unknown_method", path) from None
    if not spec.layers:
        raise AdapterFileError("adapter spec lists no layers", "metadata", path)
    cfg = method_config(spec)
    by_layer = _tensors_by_layer(adapter, method, path)
    extra = sorted(set(by_layer) - {lay.name for lay in spec.layers})
    if extra:
        raise AdapterFileError(f"tensors for layers not in the spec, e.g. {extra[0]!r}", "keys", path)
    mods = dict(model.named_modules()) if model is not None else None
    for lay in spec.layers:
        _check_layer_tensors(lay, by_layer.get(lay.name, {}), method, cfg, spec, path)
        if mods is not None:
            _check_model_layer(lay, mods.get(lay.name), path)


def _tensors_by_layer(adapter: Adapter, method, path: str | None) -> dict[str, dict]:
    """``layer -> {param: tensor}`` (shared tensors left out), after checking every key, dtype and value."""
    import torch

    by_layer: dict[str, dict] = {}
    for key, t in adapter.tensors.items():
        head, sep, pname = key.rpartition(SEP)
        if not sep:
            raise AdapterFileError(f"tensor key {key!r} has no '{SEP}' separator", "keys", path)
        trainable = pname in (method.shared_trainable() if head.startswith(SHARED + SEP) else method.trainable)
        if not t.is_floating_point():
            if trainable or t.dtype == torch.bool:
                raise AdapterFileError(f"tensor {key!r} has non-float dtype {t.dtype}", "dtype", path)
        elif not bool(torch.isfinite(t).all()):
            raise AdapterFileError(f"tensor {key!r} contains NaN or inf values", "non_finite", path)
        if not head.startswith(SHARED + SEP):
            by_layer.setdefault(head, {})[pname] = t
    return by_layer


def _check_layer_tensors(lay, p: dict, method, cfg, spec, path: str | None) -> None:
    """The layer has every trainable tensor of its method, holding as many values as its shape and rank need."""
    missing = [k for k in method.trainable if k not in p]
    if missing:
        raise AdapterFileError(f"layer {lay.name!r} lacks tensor(s) {missing} of method {spec.method!r}", "keys", path)
    try:
        expected = method.num_trainable(tuple(lay.shape), cfg)
    except (ValueError, TypeError) as e:
        raise AdapterFileError(f"layer {lay.name!r}: {e}", "shape", path) from None
    got = sum(p[k].numel() for k in method.trainable)
    if got != expected:
        shapes = {k: tuple(p[k].shape) for k in method.trainable}
        raise AdapterFileError(
            f"layer {lay.name!r} of shape {tuple(lay.shape)}: trainable tensors {shapes} hold {got} values, "
            f"{spec.method} rank {spec.rank} needs {expected}",
            "shape",
            path,
        )


def _check_model_layer(lay, mod: nn.Module | None, path: str | None) -> None:
    """The model has the layer, with a weight of the spec's shape."""
    w = getattr(mod, "weight", None) if mod is not None else None
    if w is None:
        raise AdapterFileError(
            f"layer {lay.name!r} does not exist in the model (adapter for another base model?)", "base_model", path
        )
    if tuple(w.shape) != tuple(lay.shape):
        raise AdapterFileError(
            f"layer {lay.name!r}: model weight {tuple(w.shape)} vs adapter {tuple(lay.shape)} "
            "(adapter for another base model?)",
            "base_model",
            path,
        )


def save_adapter(
    adapter: Adapter,
    path: str | os.PathLike,
    format: str = "native",
    *,
    rank: int | None = None,
    base: BaseWeights = None,
    info=None,
    **kw,
) -> ConversionReport | None:
    """Write ``adapter`` atomically as ``format``; standard formats of non-LoRA methods report the SVD error.
    ``info`` (a :class:`weights.formats.metadata.ExportInfo`): title, trigger phrase and how the adapter was made,
    written as the ``ss_*`` / ``modelspec.*`` metadata the LoRA tools read."""
    if format == "native":
        from .formats.native import save_native

        if rank is not None:
            raise ValueError("rank applies to the LoRA formats only (use weights.convert.to_lora for a native LoRA)")
        save_native(adapter, path, info)
        return None
    if format == "diffusers":
        from .formats.diffusers import save_diffusers

        return save_diffusers(adapter, path, rank=rank, base=base, info=info, **kw)
    if format == "kohya":
        from .formats.kohya import save_kohya

        return save_kohya(adapter, path, rank=rank, base=base, info=info, **kw)
    if format == "peft":
        from .formats.peft import save_peft

        return save_peft(adapter, path, rank=rank, base=base, info=info)
    raise ValueError(f"unknown adapter format {format!r}; valid: {', '.join(FORMATS)}")


def read_tensors(path: str | os.PathLike):
    """Raw ``(tensors, metadata)`` of a safetensors file with all checks (re-exported for tools)."""
    return read_safetensors(path)


def export_info(path: str | os.PathLike):
    """The :class:`weights.formats.metadata.ExportInfo` (title, trigger phrase, ...) an adapter file carries; a
    peft folder's is in its weights file."""
    from .formats.metadata import read_export_info
    from .formats.peft import WEIGHTS_NAME

    p = Path(path)
    _, meta = read_header(p / WEIGHTS_NAME if p.is_dir() else p, allow_int=True)
    return read_export_info(meta)
