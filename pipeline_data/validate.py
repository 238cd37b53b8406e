"""Check a data-build recipe against its base model and adapter method before any identity is processed.

``BuildConfig`` checks its numbers when it is made; this module checks what needs the method registry and the base
model: a known base, method parameters the method accepts, and targets that match layers of the base UNet which
the method can adapt. The UNet is built on the meta device from its config (no weights are read).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .recipe import BuildConfig


def base_folder(base: str) -> Path | None:
    """The local diffusers folder of ``base`` (a preset or a folder); None for a preset only on a model hub.

    ValueError when ``base`` is neither a preset nor a diffusers folder.
    """
    from .models import PRESETS, _looks_local, resolve_source

    if base in PRESETS:
        preset = PRESETS[base]
        source = resolve_source(preset)
        path = Path(source).expanduser()
        if path.is_dir() or preset.local_only or _looks_local(source):
            if not (path / "model_index.json").is_file():
                raise ValueError(f"--base {base}: no diffusers model_index.json in {path}")
            return path
        return None
    path = Path(base).expanduser()
    if not path.is_dir():
        raise ValueError(f"--base {base!r} is neither a preset ({', '.join(PRESETS)}) nor a model folder")
    if not (path / "model_index.json").is_file():
        raise ValueError(f"--base {base}: no diffusers model_index.json in that folder")
    return path


def _meta_unet(folder: Path):
    """The base UNet with its real layer shapes on the meta device (None when it has no readable config)."""
    from diffusers import UNet2DConditionModel

    try:
        conf = UNet2DConditionModel.load_config(str(folder), subfolder="unet")
    except (OSError, ValueError, json.JSONDecodeError):
        return None
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(conf)


def check_method_params(cfg: BuildConfig) -> None:
    """ValueError naming ``--method-params`` for keys the method does not read or values it refuses."""
    from weights.methods import get_method, method_config

    method = get_method(cfg.method)
    unknown = sorted(set(cfg.method_params) - set(method.param_keys))
    if unknown:
        ok = ", ".join(method.param_keys) if method.param_keys else "none"
        raise ValueError(f"--method-params: {cfg.method} does not accept {', '.join(unknown)} (accepted: {ok})")
    if not cfg.method_params:
        return
    mcfg = method_config(cfg.adapter_spec("check"))
    n = max(8, 2 * cfg.rank)
    try:  # the method's own checks of the values, on a small layer
        method.init_layer(torch.randn(n, n, generator=torch.Generator().manual_seed(0)), mcfg)
    except (ValueError, TypeError) as e:
        raise ValueError(f"--method-params: {e}") from None


def check_targets(cfg: BuildConfig, folder: Path) -> int:
    """Number of UNet layers the targets select; ValueError naming ``--targets`` when none, or when the method
    cannot adapt one of them (shape, kernel, rank). Returns 0 when the UNet config cannot be read."""
    from weights.inject import find_targets
    from weights.methods import get_method, method_config

    unet = _meta_unet(folder)
    if unet is None:
        return 0
    spec = cfg.adapter_spec("check")
    try:
        found = find_targets(unet, spec)
    except (ValueError, TypeError) as e:
        raise ValueError(f"--targets: {e} (in the UNet of --base {cfg.base})") from None
    method, mcfg = get_method(cfg.method), method_config(spec)
    for name, mod in found.items():
        try:
            method.check_shape(tuple(mod.weight.shape), mcfg)
        except (ValueError, TypeError) as e:
            raise ValueError(f"--method {cfg.method} cannot adapt target {name}: {e}") from None
    return len(found)


def check_basis(cfg: BuildConfig, folder: Path | None) -> None:
    """ValueError naming ``--basis`` when the basis cannot be read or does not fit the base UNet's layers."""
    from weights.basis import load_basis
    from weights.errors import AdapterFileError

    from .basis_train import basis_file

    try:
        basis = load_basis(basis_file(cfg.basis))
    except AdapterFileError as e:
        raise ValueError(f"--basis {cfg.basis}: {e}") from None
    unet = _meta_unet(folder) if folder is not None else None
    if unet is None:
        return
    mods = dict(unet.named_modules())
    for lay in basis.spec.layers:
        w = getattr(mods.get(lay.name), "weight", None)
        if w is None or tuple(w.shape) != tuple(lay.shape):
            raise ValueError(f"--basis {cfg.basis}: layer {lay.name} does not fit the UNet of --base {cfg.base}")


def validate_recipe(cfg: BuildConfig) -> None:
    """All checks above; ValueError with one clear message for the first problem found."""
    from weights.methods import METHODS

    from .recipe import BASIS_METHOD

    if cfg.method == BASIS_METHOD:
        check_basis(cfg, base_folder(cfg.base))
        return
    if cfg.method not in METHODS:
        raise ValueError(f"--method {cfg.method!r} is unknown; valid: {', '.join(sorted(METHODS))}")
    check_method_params(cfg)
    folder = base_folder(cfg.base)
    if folder is not None:
        check_targets(cfg, folder)
