"""Train the hypernetwork on a built adapter dataset and export a self-contained predictor directory."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from .adapter_data import load_adapter_dataset
from .config import HypernetConfig, get_preset
from .predict import RECIPE_NAME, save_adapter_meta
from .strict_json import dumps


def recipe_flags(build_config: dict[str, Any]) -> dict[str, Any]:
    """``difflora data build`` flag -> value of a dataset's config.json (without --faces/--out/--base)."""
    from pipeline_data.recipe import BuildConfig

    return BuildConfig.from_dict(build_config).recipe_flags()


def train_on_dataset(
    dataset_dir: str | Path,
    out_dir: str | Path,
    *,
    preset: str = "tiny",
    token_dim: int = 64,
    overrides: dict[str, Any] | None = None,
    settings: list[str] | None = None,
    min_gain: float | None = None,
    canonicalize: bool = False,
    device: str = "auto",
    resume: bool = True,
    progress: bool = True,
) -> dict:
    """Train on the dataset's ``train`` identities (``val`` for validation; ``eval`` is never touched) and write
    the predictor files (:mod:`hypernet.predict`) into ``out_dir``. Returns the final validation metrics.

    A codes dataset (``data build --method basis``, :mod:`hypernet.code_data`) trains the hypernet over codes
    (autoencoder kind ``basis``; ``token_dim`` and ``canonicalize`` do not apply: the token shape follows K) and
    writes the basis predictor's files (:mod:`hypernet.basis_predict`).

    ``overrides`` replace fields of the preset's train section; ``settings`` are ``section.field=value`` strings
    for any section (e.g. ``autoencoder.latent_tokens=8``)."""
    from .code_data import is_code_dataset, load_code_dataset
    from .train import train

    codes = is_code_dataset(dataset_dir)
    if codes:
        ds = load_code_dataset(dataset_dir, splits=("train", "val"), min_gain=min_gain)
        settings = ["autoencoder.kind=basis", *(settings or [])]
    else:
        ds = load_adapter_dataset(
            dataset_dir, token_dim=token_dim, splits=("train", "val"), min_gain=min_gain, canonicalize=canonicalize
        )
    train_set = ds.split("train")
    try:
        val_set = ds.split("val")
    except ValueError:
        val_set = None
    base = get_preset(preset).with_overrides(settings or [])
    cfg: HypernetConfig = base.for_data(ds.data.num_tokens, ds.data.token_dim, ds.data.num_layers, ds.data.cond_dim)
    if overrides:
        cfg = replace(cfg, train=replace(cfg.train, **overrides))
    out = Path(out_dir)
    final = train(cfg, train_set, out, val_set=val_set, device=device, resume=resume, progress=progress)
    if codes:
        from .basis_predict import save_basis_meta

        save_basis_meta(out, ds.basis, ds.face_backend, ds.recipe.get("base", "tiny"), ds.recipe)
    else:
        save_adapter_meta(out, ds.layout, ds.spec, ds.template, ds.face_backend)
    from weights.atomic import atomic_write_bytes

    flags = recipe_flags(ds.recipe)
    atomic_write_bytes(out / RECIPE_NAME, (dumps(flags, indent=2, sort_keys=True) + "\n").encode())
    return {
        "train_identities": len(train_set),
        "val_identities": 0 if val_set is None else len(val_set),
        "tokens": [ds.data.num_tokens, ds.data.token_dim],
        **final,
    }
