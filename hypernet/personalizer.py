"""Personalize a stock diffusers pipeline in a few lines: photos -> predicted adapter -> merged into its UNet -> undo.

>>> from diffusers import StableDiffusionPipeline
>>> from hypernet import personalize
>>> pipe = StableDiffusionPipeline.from_pretrained("assets/tiny/base")
>>> with personalize(pipe, ["me1.jpg", "me2.jpg"], hypernet="assets/tiny/hypernet") as me:
...     image = pipe(me.prompt, num_inference_steps=20).images[0]    # "a photo of sks person"
...     me.set_scale(0.5)                                             # weaker likeness, same pipeline
>>> # leaving the block (or me.remove()) puts the original weights back, bit for bit

An adapter file (any format :func:`weights.io.load_any` reads: diffusers, kohya, peft, native) takes the place of
photos: ``personalize(pipe, adapter="me.safetensors")`` (SDXL pipelines too). :class:`Personalizer` loads the
hypernetwork once for many people. Merging uses :mod:`weights.apply` (in place, exact restore, no drift), so the
pipeline stays a plain diffusers pipeline: compiled graphs, offloading hooks and schedulers keep working.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weights.adapter import Adapter
from weights.apply import ApplyState, applied, apply_adapter, restore
from weights.formats.metadata import ExportInfo

from .predict import Predictor, load_recipe

SCALE_RANGE = (-2.0, 3.0)  # adapter scales accepted everywhere (the service's adapter_scale has the same bounds)
Photo = str | os.PathLike | bytes | Any  # a path, the file's bytes, or an RGB array (H, W, 3) uint8


def check_scale(scale: float, name: str = "scale") -> float:
    """``scale`` as a float if it is finite and within :data:`SCALE_RANGE`, else a ValueError naming ``name``."""
    lo, hi = SCALE_RANGE
    try:
        s = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {scale!r}") from None
    if not (math.isfinite(s) and lo <= s <= hi):
        raise ValueError(f"{name} must be a finite number in [{lo:g}, {hi:g}], got {scale!r}")
    return s


def _unet(pipe: Any) -> torch.nn.Module:
    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, torch.nn.Module):
        raise TypeError(
            f"expected a diffusers pipeline with a UNet (StableDiffusionPipeline, StableDiffusionXLPipeline), got "
            f"{type(pipe).__name__}"
        )
    return unet


def _arch(unet: torch.nn.Module) -> str:
    return "sdxl" if getattr(unet.config, "addition_embed_type", None) == "text_time" else "sd15"


@dataclass(eq=False)
class Personalization:
    """One adapter merged into one pipeline. ``remove()`` (or leaving the ``with`` block) restores the UNet's
    original weights exactly; ``set_scale`` re-merges at another strength (0 = the base model)."""

    pipe: Any  # the diffusers pipeline, personalized in place
    adapter: Adapter  # the merged adapter (on the UNet's device)
    trigger: str = ""  # the phrase prompts must contain, e.g. "sks person" ("" when unknown)
    prompt: str = ""  # a prompt that works: the training caption, e.g. "a photo of sks person"
    identity: dict | None = None  # photos used / left out and why (when made from photos)
    scale: float = 1.0  # the strength it is merged at now
    made_by: str = ""  # how the adapter was made (file metadata)
    _state: ApplyState | None = field(default=None, repr=False)
    _removed: bool = field(default=False, repr=False)

    @property
    def active(self) -> bool:
        """True while this adapter is what the pipeline's UNet holds (False after remove or if another replaced
        it)."""
        if self._removed:
            return False
        now = applied(_unet(self.pipe))
        return (self._state is None and now is None) or (
            self._state is not None and now is not None and now.token == self._state.token
        )

    def set_scale(self, scale: float) -> Personalization:
        """Merge at strength ``scale`` (0: the base model's exact weights; 1: as trained/predicted)."""
        s = check_scale(scale)
        if self._removed:
            raise RuntimeError("this personalization was removed; call personalize() again")
        if not self.active:
            raise RuntimeError("another adapter replaced this one on the pipeline; call personalize() again")
        unet = _unet(self.pipe)
        if s == 0.0:
            restore(unet)
            self._state = None
        else:
            self._state = apply_adapter(unet, self.adapter, s)
        self.scale = s
        return self

    def remove(self) -> None:
        """Put the original UNet weights back (bit-identical). Idempotent; a no-op if another adapter replaced
        this one meanwhile (that one stays)."""
        if self._removed:
            return
        if self.active and self._state is not None:
            restore(_unet(self.pipe), self._state)
        self._removed, self._state = True, None

    def export_info(self, title: str = "") -> ExportInfo:
        """What an exported file says about this adapter (title, trigger phrase, how it was made)."""
        unet = _unet(self.pipe)
        side = int(unet.config.sample_size) * int(getattr(self.pipe, "vae_scale_factor", 8))
        used = len(self.identity["inliers"]) if self.identity else None
        return ExportInfo(
            title=title[:200], trigger=self.trigger, caption=self.prompt, arch=_arch(unet),
            base_model=self.adapter.spec.base_model, resolution=side, num_images=used or None, made_by=self.made_by,
        )  # fmt: skip

    def save(self, path: str | os.PathLike, format: str = "diffusers", *, title: str = "") -> None:
        """Write the adapter as ``format`` (diffusers: ``pipe.load_lora_weights``; kohya: ComfyUI, AUTOMATIC1111/
        Forge; peft: a folder; native: lossless), with its trigger phrase and training metadata."""
        from weights.formats import FORMATS, export_needs_base
        from weights.io import save_adapter

        if format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
        kw: dict = {}
        unet = _unet(self.pipe)
        if format == "kohya":
            lpb = unet.config.layers_per_block
            kw = {"arch": _arch(unet), "layers_per_block": lpb if isinstance(lpb, int) else 2}
        info = self.export_info(title)
        if not export_needs_base(self.adapter.spec, format):
            save_adapter(self.adapter, path, format, info=info, **kw)
            return
        # the conversion to LoRA needs the base weights: take them with this adapter unmerged for a moment
        scale, merged = self.scale, self.active and self._state is not None
        if merged:
            restore(unet, self._state)
        try:
            save_adapter(self.adapter, path, format, base=unet, info=info, **kw)
        finally:
            if merged:
                self._state = apply_adapter(unet, self.adapter, scale)

    def __enter__(self) -> Personalization:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class Personalizer:
    """A hypernetwork directory, loaded once: ``predict(photos)`` -> adapter, ``personalize(pipe, photos)``."""

    def __init__(self, predictor: Predictor, recipe=None, *, source: str = "") -> None:
        from pipeline_data.recipe import BuildConfig

        self.predictor = predictor
        self.recipe = recipe or BuildConfig()
        self.source = source  # where the hypernetwork was loaded from (for file metadata)

    @classmethod
    def from_pretrained(cls, hypernet: str | os.PathLike, device: torch.device | str = "cpu") -> Personalizer:
        """Load ``hypernet`` (a predictor directory such as ``assets/tiny/hypernet``) on ``device``."""
        d = Path(hypernet).expanduser()
        if not d.is_dir():
            raise FileNotFoundError(f"hypernet {d}: no such folder (expected a predictor directory)")
        return cls(Predictor.load(d, device=device), load_recipe(d), source=d.name)

    @property
    def trigger(self) -> str:
        return self.recipe.trigger

    @property
    def prompt(self) -> str:
        return self.recipe.caption

    def predict(self, photos: Sequence[Photo], *, seed: int = 0, encoder=None) -> tuple[Adapter, dict]:
        """(adapter, identity report) of one person's photos; photos without a usable face or of someone else are
        left out (the report says which and why); ValueError when none is usable."""
        if isinstance(photos, (str, os.PathLike, bytes)):
            photos = [photos]
        photos = list(photos)
        if not 1 <= len(photos) <= 100:
            raise ValueError(f"photos: need 1..100 photos of one person, got {len(photos)}")
        return self.predictor.predict_photos(photos, encoder=encoder, seed=seed)

    def personalize(
        self, pipe: Any, photos: Sequence[Photo], *, scale: float = 1.0, seed: int = 0, encoder=None
    ) -> Personalization:
        """Predict the person's adapter and merge it into ``pipe`` at ``scale``."""
        check_scale(scale)
        _unet(pipe)
        adapter, ident = self.predict(photos, seed=seed, encoder=encoder)
        made_by = f"difflora hypernet prediction ({self.source})" if self.source else "difflora hypernet prediction"
        return _merge(pipe, adapter, scale, trigger=self.trigger, prompt=self.prompt, identity=ident, made_by=made_by)


def _merge(pipe: Any, adapter: Adapter, scale: float, **kw: Any) -> Personalization:
    unet = _unet(pipe)
    s = check_scale(scale)
    adapter = adapter.to(unet.device)
    p = Personalization(pipe, adapter, scale=s, **kw)
    p._state = apply_adapter(unet, adapter, s) if s != 0.0 else None
    if s == 0.0:
        restore(unet)
    return p


_LOADED: dict[tuple[str, str], Personalizer] = {}  # personalize()'s hypernets, by (folder, device)


def personalize(
    pipe: Any,
    photos: Sequence[Photo] | None = None,
    *,
    hypernet: str | os.PathLike | Personalizer | None = None,
    adapter: str | os.PathLike | Adapter | None = None,
    scale: float = 1.0,
    seed: int = 0,
    trigger: str | None = None,
) -> Personalization:
    """Personalize ``pipe`` (a diffusers SD 1.x / SDXL pipeline) in place and return the handle that undoes it.

    Either ``photos`` of one person with ``hypernet`` (a predictor directory, loaded once per process, or a
    :class:`Personalizer`), or ``adapter``: a file in any supported format (or an :class:`Adapter`), checked
    against the pipeline's UNet. ``scale``: merge strength in [-2, 3] (0 = base model). ``trigger`` overrides the
    trigger phrase read from the hypernet's recipe or the file's metadata.
    """
    check_scale(scale)
    unet = _unet(pipe)
    if (photos is None) == (adapter is None):
        raise ValueError("pass either photos (with hypernet=...) or adapter=..., not both and not neither")
    if trigger is not None and (not isinstance(trigger, str) or len(trigger) > 200):
        raise ValueError("trigger must be text of at most 200 characters")
    if adapter is not None:
        info = ExportInfo()
        if isinstance(adapter, Adapter):
            ad = adapter
        else:
            from weights.io import export_info, load_any

            ad = load_any(adapter, unet)
            info = export_info(adapter)
        p = _merge(pipe, ad, scale, trigger=info.trigger, prompt=info.caption, made_by=info.made_by)
    else:
        if hypernet is None:
            raise ValueError("photos need hypernet=... (a predictor directory such as assets/tiny/hypernet)")
        if not isinstance(hypernet, Personalizer):
            key = (str(Path(hypernet).expanduser().resolve()), str(unet.device))
            if key not in _LOADED:
                _LOADED[key] = Personalizer.from_pretrained(hypernet, device=unet.device)
            hypernet = _LOADED[key]
        p = hypernet.personalize(pipe, photos, scale=scale, seed=seed)
    if trigger is not None:
        p.trigger = trigger
    return p


__all__ = ["SCALE_RANGE", "Personalization", "Personalizer", "check_scale", "personalize"]
