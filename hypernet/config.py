"""Hypernetwork configuration: autoencoder, denoiser and training dataclasses, plus a preset registry.

The data-dependent sizes (``token_dim``, ``num_tokens``, ``num_layers``, ``cond_dim``) are filled in from the
dataset by :meth:`HypernetConfig.for_data`; presets only fix the model and training sizes.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

SCHEDULES = ("cosine", "linear")
PREDICTIONS = ("v", "epsilon")
AMP_MODES = ("auto", "bf16", "off")
AE_KINDS = ("transformer", "linear", "basis")


@dataclass
class AutoencoderConfig:
    """DiffLoRA's weight autoencoder (LAE): adapter tokens (B, T, D) <-> latent tokens (B, T_lat, D_lat)."""

    # transformer (trained, DiffLoRA's LAE) | linear (closed-form face-predictable subspace) | basis (the tokens are
    # an identity-basis code, hypernet/code_autoencoder.py: no autoencoder, the basis decodes; latent = tokens)
    kind: str = "transformer"
    token_dim: int = 64  # D: entries per adapter token (set from the dataset)
    num_tokens: int = 32  # T: tokens per adapter (set from the dataset)
    num_layers: int = 8  # distinct layer ids, max id + 1 (set from the dataset)
    hidden: int = 128  # transformer width
    depth_enc: int = 2  # encoder transformer blocks
    depth_dec: int = 2  # decoder transformer blocks
    heads: int = 4  # attention heads (hidden must be divisible by heads)
    mlp_ratio: float = 4.0  # MLP hidden = mlp_ratio * hidden
    latent_tokens: int = 8  # T_lat: learned query tokens that become the latent
    latent_dim: int = 16  # D_lat: channels per latent token
    input_noise: float = 0.01  # std of Gaussian noise added to normalised input tokens while training
    latent_noise: float = 0.05  # std of Gaussian noise added to the (unit-RMS) latent while training
    magnitude_weight: float = 1.0  # lambda in the loss weight w = 1 + lambda * |x_raw| / mean|x_raw|
    ridge: float = 1.0  # linear kind: ridge penalty of the face -> adapter regression that spans the latent

    @property
    def latent_shape(self) -> tuple[int, int]:
        """(T_lat, D_lat) of the latent the denoiser generates (the token shape itself for the basis kind)."""
        if self.kind == "basis":
            return self.num_tokens, self.token_dim
        return self.latent_tokens, self.latent_dim

    def __post_init__(self) -> None:
        _check_heads(self.hidden, self.heads, "autoencoder")
        if self.kind not in AE_KINDS:
            raise ValueError(f"autoencoder kind must be one of {AE_KINDS}, got {self.kind!r}")
        if self.ridge <= 0:
            raise ValueError(f"autoencoder ridge must be > 0, got {self.ridge}")
        for name in ("token_dim", "num_tokens", "num_layers", "latent_tokens", "latent_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"autoencoder {name} must be >= 1, got {getattr(self, name)}")


@dataclass
class DenoiserConfig:
    """DiT-style denoiser over latent tokens, with the Gaussian diffusion process it is trained for."""

    cond_dim: int = 512  # E: face-embedding (+ image feature) dims per condition token (set from the dataset)
    hidden: int = 256  # transformer width
    depth: int = 6  # DiT blocks (self-attn + cross-attn + MLP)
    heads: int = 4  # attention heads
    mlp_ratio: float = 4.0  # MLP hidden = mlp_ratio * hidden
    cond_drop_prob: float = 0.1  # probability a training sample sees the learned null condition (for CFG)
    num_timesteps: int = 1000  # discrete diffusion steps
    schedule: str = "cosine"  # noise schedule: cosine | linear
    prediction: str = "v"  # network target: v (velocity) | epsilon (noise)

    def __post_init__(self) -> None:
        _check_heads(self.hidden, self.heads, "denoiser")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")


@dataclass
class TrainConfig:
    """Two-stage training: the autoencoder first, then the denoiser on the frozen autoencoder's latents."""

    seed: int = 0  # seeds model init and the single training RNG (batches, noise, timesteps, dropout)
    batch_size: int = 64  # identities per step
    ae_steps: int = 2000  # stage 1: autoencoder steps
    dn_steps: int = 10000  # stage 2: denoiser steps
    ae_lr: float = 1e-3  # stage 1 peak learning rate
    dn_lr: float = 3e-4  # stage 2 peak learning rate
    weight_decay: float = 0.01  # AdamW weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    warmup_steps: int = 100  # linear warm-up per stage, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1  # final LR as a fraction of the peak
    grad_clip: float = 1.0  # max global grad norm (0 disables)
    ema_decay: float = 0.999  # EMA decay (with warm-up: min(decay, (1 + n) / (10 + n)) at stage step n)
    max_cond_photos: int = 8  # each sample sees a random subset of 1..min(P_i, this) photos
    amp: str = "auto"  # bf16 autocast: auto (CUDA with bf16 only) | bf16 (also on CPU) | off
    log_every: int = 10  # steps between JSONL metric lines
    eval_every: int = 250  # steps between validation metrics (EMA model)
    ckpt_every: int = 1000  # steps between checkpoints (one is always written at the end)
    keep_checkpoints: int = 2  # how many step checkpoints to keep

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # JSON gives a list
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        for name in ("batch_size", "max_cond_photos", "log_every", "eval_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train {name} must be >= 1, got {getattr(self, name)}")
        if self.ae_steps < 0 or self.dn_steps < 0:
            raise ValueError(f"ae_steps/dn_steps must be >= 0, got {self.ae_steps}/{self.dn_steps}")

    @property
    def total_steps(self) -> int:
        return self.ae_steps + self.dn_steps


@dataclass
class SamplingConfig:
    """How a trained hypernet samples an adapter. Its own file beside the checkpoint (``sampling.json``): training
    writes the preset's, ``hypernet tune`` replaces it with the option it chose on val identities, and
    :class:`hypernet.predict.Predictor` uses it as its defaults. The final validation of a training run uses it too."""

    steps: int = 50  # DDIM steps (1: the posterior mean E[z | photos] in one step)
    cfg_scale: float = 1.0  # classifier-free guidance scale (1: the conditional model alone)
    samples: int = 1  # DDIM samples averaged per prediction (>1: a posterior-mean estimate)

    def __post_init__(self) -> None:
        for name in ("steps", "samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"sampling {name} must be >= 1, got {getattr(self, name)}")
        if not math.isfinite(self.cfg_scale):
            raise ValueError(f"sampling cfg_scale must be a finite number, got {self.cfg_scale}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingConfig:
        return cls(**_checked(cls, "sampling", d))


SECTIONS = ("autoencoder", "denoiser", "train", "sampling")
# knobs that one autoencoder kind never reads: setting them with that kind is refused, not silently ignored
IGNORED_BY_KIND: dict[str, frozenset[str]] = {
    "linear": frozenset(
        {
            f"autoencoder.{k}"
            for k in (
                "hidden",
                "depth_enc",
                "depth_dec",
                "heads",
                "mlp_ratio",
                "input_noise",
                "latent_noise",
                "magnitude_weight",
            )
        }
        | {"train.ae_steps", "train.ae_lr"}
    ),  # fmt: skip
    "transformer": frozenset({"autoencoder.ridge"}),
}


def refuse_ignored(kind: str, keys: list[str] | set[str]) -> None:
    """A ValueError naming the ``section.field`` keys that the ``kind`` autoencoder does not read."""
    bad = sorted(k for k in keys if k in IGNORED_BY_KIND.get(kind, ()))
    if bad:
        other = "transformer" if kind == "linear" else "linear"
        raise ValueError(
            f"{', '.join(bad)} {'has' if len(bad) == 1 else 'have'} no effect with autoencoder.kind={kind} "
            f"(only the {other} kind reads {'it' if len(bad) == 1 else 'them'}); drop "
            f"{'it' if len(bad) == 1 else 'them'} or set autoencoder.kind={other}"
        )


@dataclass
class HypernetConfig:
    """Everything needed to rebuild (and re-train) a hypernetwork and sample from it. The first three sections are
    stored as ``config.json``; ``sampling`` as ``sampling.json`` beside it (:mod:`hypernet.checkpoint`)."""

    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self) -> None:
        ae, k = self.autoencoder, self.autoencoder.latent_tokens * self.autoencoder.latent_dim
        if ae.kind == "linear" and k > self.denoiser.cond_dim:
            # its latent is spanned by a regression on the E-dim face embeddings: at most E directions exist, and
            # the basis costs k x (adapter values) (the sd15 preset's 64 x 32 latent: 15 GB at SD 1.5 size)
            raise ValueError(
                f"the linear autoencoder has at most cond_dim={self.denoiser.cond_dim} latent directions, got "
                f"latent_tokens x latent_dim = {ae.latent_tokens} x {ae.latent_dim} = {k}; "
                "use e.g. --set autoencoder.latent_tokens=8 --set autoencoder.latent_dim=4"
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["train"]["betas"] = list(self.train.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HypernetConfig:
        unknown = set(d) - set(SECTIONS)
        if unknown:
            raise ValueError(f"unknown hypernet config sections: {sorted(unknown)}")
        return cls(
            autoencoder=AutoencoderConfig(**_checked(AutoencoderConfig, "autoencoder", d.get("autoencoder", {}))),
            denoiser=DenoiserConfig(**_checked(DenoiserConfig, "denoiser", d.get("denoiser", {}))),
            train=TrainConfig(**_checked(TrainConfig, "train", d.get("train", {}))),
            sampling=SamplingConfig.from_dict(d.get("sampling", {})),
        )

    def with_overrides(self, items: list[str] | dict[str, Any]) -> HypernetConfig:
        """A copy with ``section.field=value`` overrides (values parsed as JSON, else kept as strings). A knob that
        the resulting autoencoder kind does not read is refused (:data:`IGNORED_BY_KIND`)."""
        d = self.to_dict()
        pairs = list(items.items()) if isinstance(items, dict) else [_split_override(s) for s in items]
        for key, value in pairs:
            section, _, name = key.partition(".")
            if section not in d or name not in d[section]:
                fields_ = sorted(f"{sec}.{f}" for sec in d for f in d[sec])
                raise ValueError(f"unknown hypernet setting {key!r}; one of: {', '.join(fields_)}")
            d[section][name] = value
        cfg = HypernetConfig.from_dict(d)
        refuse_ignored(cfg.autoencoder.kind, {k for k, _ in pairs})
        return cfg

    def for_data(self, num_tokens: int, token_dim: int, num_layers: int, cond_dim: int) -> HypernetConfig:
        """A copy with the data-dependent sizes set."""
        ae = replace(self.autoencoder, num_tokens=num_tokens, token_dim=token_dim, num_layers=num_layers)
        if ae.kind == "basis":  # the code tokens are the latent
            ae = replace(ae, latent_tokens=num_tokens, latent_dim=token_dim)
        return replace(self, autoencoder=ae, denoiser=replace(self.denoiser, cond_dim=cond_dim))


def _split_override(item: str) -> tuple[str, Any]:
    import json

    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ValueError(f"expected SECTION.FIELD=VALUE, got {item!r}")
    try:
        return key.strip(), json.loads(raw)
    except json.JSONDecodeError:
        return key.strip(), raw


def _checked(cls: type, section: str, values: Any) -> dict[str, Any]:
    """``values`` of one config section, each checked against its field's type (finite numbers for floats)."""
    if not isinstance(values, dict):
        raise ValueError(f"hypernet config section {section!r} must be an object, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"unknown hypernet setting(s) {', '.join(f'{section}.{k}' for k in unknown)}")
    for name, value in values.items():
        _check_type(f"{section}.{name}", hints[name], value)
    return values


def _check_type(key: str, hint: Any, value: Any) -> None:
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{key} must be a finite number, got {value!r}")
    if hint is str and not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {value!r}")
    if typing.get_origin(hint) is tuple:
        items = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise ValueError(f"{key} must be a list of {len(items)} values, got {value!r}")
        for i, (h, v) in enumerate(zip(items, value, strict=True)):
            _check_type(f"{key}[{i}]", h, v)


def _check_heads(hidden: int, heads: int, where: str) -> None:
    if heads < 1 or hidden % heads:
        raise ValueError(f"{where} hidden={hidden} must be divisible by heads={heads}")


# ----------------------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------------------


def tiny() -> HypernetConfig:
    """The bundled tiny world's hypernet (assets/tiny/hypernet): trains in a few minutes on 2 CPU cores.

    Its autoencoder is the closed-form linear kind: on the tiny LoRA dataset the trained transformer LAE spends its
    latent on optimiser noise (docs/hypernet.md); ``--set autoencoder.kind=transformer`` gives DiffLoRA's LAE with
    the ``hidden``/``depth`` sizes below."""
    return HypernetConfig(
        autoencoder=AutoencoderConfig(
            kind="linear", hidden=64, depth_enc=2, depth_dec=2, heads=4, latent_tokens=8, latent_dim=4
        ),
        denoiser=DenoiserConfig(hidden=96, depth=3, heads=4),
        train=TrainConfig(
            batch_size=64,
            ae_steps=800,
            dn_steps=2000,
            ae_lr=2e-3,
            dn_lr=1e-3,
            warmup_steps=30,
            ema_decay=0.99,
            eval_every=100,
            ckpt_every=500,
        ),
        sampling=SamplingConfig(steps=25),
    )


def sd15() -> HypernetConfig:
    """SD 1.5 adapters (hundreds of tokens per adapter) on one GPU."""
    return HypernetConfig(
        autoencoder=AutoencoderConfig(hidden=384, depth_enc=4, depth_dec=4, heads=6, latent_tokens=64, latent_dim=32),
        denoiser=DenoiserConfig(hidden=512, depth=12, heads=8),
        train=TrainConfig(batch_size=64, ae_steps=20_000, dn_steps=100_000, ae_lr=3e-4, dn_lr=1e-4, warmup_steps=1000),
    )


def sdxl() -> HypernetConfig:
    """SDXL adapters (more and wider layers) on one GPU."""
    return HypernetConfig(
        autoencoder=AutoencoderConfig(hidden=512, depth_enc=6, depth_dec=6, heads=8, latent_tokens=128, latent_dim=32),
        denoiser=DenoiserConfig(hidden=768, depth=16, heads=12),
        train=TrainConfig(batch_size=64, ae_steps=30_000, dn_steps=200_000, ae_lr=2e-4, dn_lr=1e-4, warmup_steps=2000),
    )


PRESETS: dict[str, Callable[[], HypernetConfig]] = {"tiny": tiny, "sd15": sd15, "sdxl": sdxl}


def get_preset(name: str) -> HypernetConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown hypernet preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]()
