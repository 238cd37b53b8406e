"""The data-build recipe: one dataclass, the same for every identity so all adapters share one weight space."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from weights.spec import AdapterSpec

# Targets that give the adapter layers at every resolution of the UNet (attention, resnet convs, proj, ff):
# attention-only rank-4 LoRAs carried almost no identity in the tiny-world probes (docs/tiny.md, "The first probes").
FULL_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
]
ATTN_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TARGET_PRESETS = {"full": FULL_TARGETS, "attn": ATTN_TARGETS}
BASIS_METHOD = "basis"  # data build --method basis: fit a code per identity in an identity basis (weights.basis)


@dataclass
class BuildConfig:
    """Options of ``difflora data build`` (everything but the inputs/outputs)."""

    base: str = "tiny"  # base-model preset name or a local diffusers folder
    method: str = "lora"  # adapter method (weights.methods registry)
    rank: int = 4  # adapter rank
    alpha: float | None = None  # None -> alpha = rank (scale 1)
    method_params: dict[str, Any] = field(default_factory=dict)  # method-specific hyper-parameters
    targets: list[str] = field(default_factory=lambda: list(FULL_TARGETS))  # UNet module patterns
    steps: int = 50  # optimisation steps per identity (probes: 50 @ 2e-3 keeps ~89 % of 100 @ 1e-3's gain)
    lr: float = 2e-3  # AdamW learning rate
    batch_size: int = 8  # images per step
    seed: int = 0  # same seed for every identity (init, noise, batches)
    caption: str = "a photo of sks person"  # DreamBooth caption with the identity token
    class_prompt: str = "a photo of a person"  # prior-preservation prompt (and the base model's caption)
    prior_weight: float = 0.0  # prior-preservation loss weight; 0 disables it
    prior_images: int = 16  # base-model images generated for prior preservation
    min_photos: int = 4  # minimum usable photos per identity (held-out included)
    max_photos: int = 12  # at most this many photos per identity are read
    face_backend: str = "dlib"  # faces backend used for filtering, crops and the identity check
    crop_padding: float = 0.3  # aligned-crop padding (the tiny base was trained with 0.3)
    device: str = "cpu"  # torch device for training
    threads: int = 0  # torch threads per process (0: leave torch's default)
    check_identities: int = 16  # identities sampled for the identity check run by the build (0: skip)
    check_seeds: int = 8  # generations per adapter in the identity check
    check_steps: int = 20  # DDIM steps of the identity check generations
    check_guidance: float = 3.0  # CFG scale of the identity check generations
    basis: str = ""  # method "basis": the identity basis codes are fitted in ("data basis" folder or its file)

    def __post_init__(self) -> None:
        for name in ("rank", "steps", "batch_size", "prior_images", "check_seeds", "check_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("threads", "check_identities"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.min_photos < 2:
            raise ValueError("min_photos must be >= 2 (one held out, one to train on)")
        if self.max_photos < self.min_photos:
            raise ValueError(f"max_photos ({self.max_photos}) must be >= min_photos ({self.min_photos})")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a finite number > 0, got {self.alpha}")
        for name in ("prior_weight", "crop_padding", "check_guidance"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if not isinstance(self.method_params, dict):
            raise ValueError(f"method_params must be a JSON object, got {json.dumps(self.method_params, default=str)}")
        if not self.targets:
            raise ValueError("targets must name at least one module pattern")
        if self.method == BASIS_METHOD and not self.basis:
            raise ValueError("method basis needs the identity basis to fit codes in (--basis DIR of 'data basis')")
        if self.basis and self.method != BASIS_METHOD:
            raise ValueError(f"basis applies to method basis only (method is {self.method})")

    @property
    def base_model_id(self) -> str:
        """The id stamped into adapter specs: the preset name, also when ``base`` is the preset's own folder."""
        from pathlib import Path

        from .models import PRESETS, resolve_source

        for name, preset in PRESETS.items():
            if self.base == name or Path(self.base).expanduser().resolve() == Path(resolve_source(preset)).resolve():
                return name
        return Path(self.base).name or self.base

    def adapter_spec(self, base_model: str | None = None) -> AdapterSpec:
        """The spec every identity's adapter has (method "basis": the basis' LoRA spec, read from its file)."""
        if self.method == BASIS_METHOD:
            import dataclasses

            from weights.basis import load_basis

            from .basis_train import basis_file

            spec = load_basis(basis_file(self.basis)).spec
            return dataclasses.replace(spec, base_model=self.base_model_id if base_model is None else base_model)
        return AdapterSpec(
            method=self.method,
            rank=self.rank,
            alpha=self.alpha,
            params=dict(self.method_params),
            targets=list(self.targets),
            base_model=self.base_model_id if base_model is None else base_model,
        )

    def training_dict(self) -> dict[str, Any]:
        """The fields that define how adapters are trained (hashed: a change means a new dataset)."""
        skip = {"device", "threads", "check_identities", "check_seeds", "check_steps", "check_guidance"}
        return {k: v for k, v in asdict(self).items() if k not in skip}

    def recipe_flags(self) -> dict[str, Any]:
        """``difflora data build`` flag -> value (without --faces/--out/--base), for dataset_recipe.json."""
        skip = {"base"} if self.method == BASIS_METHOD else {"base", "basis"}
        return {"--" + k.replace("_", "-"): v for k, v in self.training_dict().items() if k not in skip}

    @classmethod
    def from_flags(cls, flags: dict[str, Any], **kw: Any) -> BuildConfig:
        """Inverse of :meth:`recipe_flags` (``{"--rank": 4, ...}``, e.g. a predictor's dataset_recipe.json); ``kw``
        set the other fields (``base=...``)."""
        return cls.from_dict({k.lstrip("-").replace("-", "_"): v for k, v in flags.items()} | kw)

    @property
    def trigger(self) -> str:
        """The phrase of the caption that stands for the person (``"sks person"``): what prompts must contain."""
        from weights.formats.metadata import trigger_of

        return trigger_of(self.caption, self.class_prompt)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BuildConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
