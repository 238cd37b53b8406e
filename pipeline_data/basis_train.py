"""Learn an identity basis (``weights.basis``) jointly with one code per training identity (auto-decoder), and fit
the code of a new identity with the basis frozen.

``train_basis`` prepares the train-split identities exactly as ``data build`` does (``build.prepare_identity``:
consistency filter, held-out photos removed, aligned crops; ``adapter_train.encode_latents``: VAE latents with
flips), then optimises the basis (shared A per layer, K directions B_k) and the codes ``c_i`` with the recipe's
DreamBooth denoising loss (``adapter_train.denoising_loss``, the caption), each batch mixing identities through the
per-sample forward (``weights.per_sample``). Output folder::

    config.json            the BasisTrainConfig (a different config refuses to mix in)
    prepared/<id>.json     prepared identity records; prepared/<id>.safetensors their latents (reused on re-runs)
    identities.jsonl       the training identities' records (code row i = line i)
    basis.safetensors      the basis (weights.basis file format), rewritten at each checkpoint
    codes.safetensors      "codes" (I, K) of the training identities, identity ids in the metadata
    checkpoint.safetensors basis + codes + optimizer + RNG state + step (``--resume`` continues from it)
    metrics.jsonl, loss.png per-step loss and its plot
    summary.json           identities, photos, steps, first/last loss, seconds per step

``fit_code`` (``data build --method basis --basis DIR``) optimises one identity's code from zero, basis frozen,
with the build recipe's loop (``adapter_train.optimise``: steps, lr, batch, warm-up, clipping).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weights.basis import BasisModule, IdentityBasis, basis_per_sample, basis_to_lora, init_basis
from weights.per_sample import per_sample_adapters
from weights.safetensors_io import atomic_write_bytes, read_safetensors, write_safetensors

from .adapter_train import TrainResult, denoising_loss, draw_batch, encode_latents, optimise, unet_conditioning
from .recipe import FULL_TARGETS, BuildConfig

BASIS_NAME = "basis.safetensors"
CODES_NAME = "codes.safetensors"
CKPT_NAME = "checkpoint.safetensors"


@dataclass
class BasisTrainConfig:
    """Options of ``difflora data basis`` (everything but the inputs/outputs)."""

    base: str = "tiny"  # base-model preset name or a local diffusers folder
    num_directions: int = 32  # K, the dimension of the identity space
    rank: int = 4  # rank r of every identity's LoRA (the shared down-projection's rows)
    alpha: float | None = None  # LoRA alpha of the identities' adapters; None -> alpha = rank (scale 1)
    targets: list[str] = field(default_factory=lambda: list(FULL_TARGETS))  # UNet module patterns (recipe's)
    steps: int = 1500  # optimisation steps (probe: 1,500 of 16, loss still falling)
    batch_size: int = 16  # latents per step, each of a randomly drawn identity
    lr_basis: float = 1e-3  # Adam learning rate of the basis (A and B_k)
    lr_codes: float = 1e-2  # Adam learning rate of the identity codes
    code_init_std: float = 0.1  # codes start at N(0, std²)
    code_reg: float = 0.0  # weight of the mean ‖c‖² of the batch's codes (auto-decoder prior); 0: off
    train_down: bool = True  # learn the shared down-projection too (False: A stays its random init)
    grad_clip: float = 0.0  # clip the gradient norm of all parameters at this value; 0: off
    seed: int = 0  # init, VAE latent sampling, batches and noise
    caption: str = "a photo of sks person"  # the recipe's DreamBooth caption
    min_photos: int = 1  # minimum usable photos per identity (1: single-photo people train, with none held out)
    max_photos: int = 12  # at most this many photos per identity are read
    face_backend: str = "dlib"  # faces backend for the consistency filter and the aligned crops
    crop_padding: float = 0.3  # aligned-crop padding (the tiny base was trained with 0.3)
    device: str = "cpu"  # torch device
    threads: int = 0  # torch threads (0: torch's default)
    checkpoint_every: int = 100  # steps between checkpoints (and output rewrites)

    def __post_init__(self) -> None:
        for name in ("num_directions", "rank", "steps", "batch_size", "min_photos", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if self.max_photos < self.min_photos:
            raise ValueError(f"max_photos ({self.max_photos}) must be >= min_photos ({self.min_photos})")
        for name in ("lr_basis", "lr_codes"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        for name in ("code_init_std", "code_reg", "grad_clip", "crop_padding"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a finite number > 0, got {self.alpha}")
        if not self.targets:
            raise ValueError("targets must name at least one module pattern")

    def prep_config(self) -> BuildConfig:
        """The data-build recipe whose identity preparation (and model loading) this training reuses."""
        return BuildConfig(
            base=self.base, rank=self.rank, targets=list(self.targets), seed=self.seed, caption=self.caption,
            min_photos=max(2, self.min_photos), max_photos=max(2, self.max_photos), face_backend=self.face_backend,
            crop_padding=self.crop_padding, device=self.device, threads=self.threads, check_identities=0,
        )  # fmt: skip

    def training_dict(self) -> dict[str, Any]:
        """The fields that define the result (a change means a new output folder). Not ``steps``: the learning
        rates are constant, so ``--resume`` with more steps extends a run exactly."""
        skip = ("device", "threads", "checkpoint_every", "steps")
        return {k: v for k, v in asdict(self).items() if k not in skip}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BasisTrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


# ---- data ---------------------------------------------------------------------------------------------------


def train_sources(faces_dirs: Sequence[str | Path], limit: int | None = None) -> list:
    """The train-split identity folders under ``faces_dirs`` (``build.discover``), the first ``limit`` of them."""
    from .build import discover
    from .splits import split_of

    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    sources = [s for s in discover(faces_dirs) if split_of(s.dataset, s.name) == "train"]
    if not sources:
        raise ValueError(f"no train-split identity folders with photos in {', '.join(map(str, faces_dirs))}")
    return sources[:limit]


def prepare_training_set(
    sources: Sequence, out: Path, cfg: BasisTrainConfig, *, progress: bool = True
) -> tuple[list[dict], list[torch.Tensor]]:
    """Records and latents ((2N, C, h, w) each: photos and mirror images) of the usable identities of ``sources``.

    Each identity is prepared once (``prepared/<id>.*`` in ``out``); re-runs read it back.
    """
    from tqdm.auto import tqdm

    from .build import _worker_state, prepare_identity

    prep = cfg.prep_config()
    pipe, encoder, _ = _worker_state(prep)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    pdir = out / "prepared"
    pdir.mkdir(parents=True, exist_ok=True)
    recs, lats = [], []
    for src in tqdm(sources, desc="identities", unit="id", disable=not progress):
        rec_path, lat_path = pdir / f"{src.id}.json", pdir / f"{src.id}.safetensors"
        rec = json.loads(rec_path.read_text()) if rec_path.is_file() else None
        if rec is None or (rec["status"] == "ok" and not lat_path.is_file()):
            rec = prepare_identity(src, prep, encoder, size, min_photos=cfg.min_photos)
            if rec["status"] == "ok":
                crops = rec.pop("_crops")
                rec.pop("_heldout_crops")  # held-out photos are never trained on
                z = encode_latents(pipe, crops, torch.Generator("cpu").manual_seed(cfg.seed))  # as train_identity
                write_safetensors(lat_path, {"latents": z}, {"identity": src.id})
            _write_json(rec_path, rec)
        if rec["status"] == "ok":
            recs.append(rec)
            lats.append(read_safetensors(lat_path)[0]["latents"])
    if not recs:
        raise ValueError(f"none of the {len(sources)} train-split identities has {cfg.min_photos} usable photo(s)")
    return recs, lats


# ---- training -----------------------------------------------------------------------------------------------


def _optimizer(mod: BasisModule, codes: torch.nn.Parameter, cfg: BasisTrainConfig) -> torch.optim.Adam:
    basis_params = [p for p in mod.parameters() if p.requires_grad]
    return torch.optim.Adam([{"params": basis_params, "lr": cfg.lr_basis}, {"params": [codes], "lr": cfg.lr_codes}])


def _state_tensors(mod: BasisModule, codes: torch.Tensor) -> dict[str, torch.Tensor]:
    return {**{f"basis.{k}": v for k, v in mod.state_dict().items()}, "codes": codes.detach()}


def _save_outputs(out: Path, mod: BasisModule, codes: torch.Tensor, ids: list[str], metrics: list[dict]) -> None:
    from weights.basis import save_basis

    from .plots import plot_loss

    basis = mod.to_basis()
    save_basis(basis, out / BASIS_NAME)
    write_safetensors(
        out / CODES_NAME, {"codes": codes.detach()}, {"identities": json.dumps(ids), "basis": basis.fingerprint()}
    )
    atomic_write_bytes(out / "metrics.jsonl", "".join(json.dumps(m, sort_keys=True) + "\n" for m in metrics).encode())
    plot_loss([m["step"] for m in metrics], [m["loss"] for m in metrics], out / "loss.png", "identity basis")


def _check_out(out: Path, cfg: BasisTrainConfig, resume: bool) -> None:
    from .build import changed_fields

    path = out / "config.json"
    diff = changed_fields(path, cfg)
    if diff:
        raise ValueError(f"{out} holds a basis trained with another config (differs in: {', '.join(diff)})")
    if (out / CKPT_NAME).exists() and not resume:
        raise ValueError(f"{out} holds a checkpoint: pass --resume to continue it, or use a new --out")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(path, asdict(cfg))


def train_basis(
    faces_dirs: Sequence[str | Path],
    out_dir: str | Path,
    cfg: BasisTrainConfig,
    *,
    limit: int | None = None,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> dict:
    """Learn the basis and the training identities' codes; returns the summary (also ``summary.json``).

    ``resume`` continues from the folder's checkpoint (same config): the result equals an uninterrupted run.
    ``on_step(step, loss)`` is called after each step (after that step's checkpoint, if it has one).
    """
    from tqdm.auto import tqdm

    from pipeline_data.tiny.ckpt import load_checkpoint, load_optimizer, optimizer_tensors

    from .validate import base_folder, check_targets

    out = Path(out_dir)
    folder = base_folder(cfg.base)
    if folder is not None:
        check_targets(cfg.prep_config(), folder)
    sources = train_sources(faces_dirs, limit)  # bad inputs fail here, before anything is written
    _check_out(out, cfg, resume)
    t_start = time.perf_counter()
    recs, lats = prepare_training_set(sources, out, cfg, progress=progress)
    ids = [r["identity"] for r in recs]
    atomic_write_bytes(out / "identities.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in recs).encode())
    from .build import _worker_state

    pipe, _, _ = _worker_state(cfg.prep_config())
    unet = pipe.unet
    device = unet.device
    g = torch.Generator("cpu").manual_seed(cfg.seed)
    basis = init_basis(
        unet, cfg.targets, cfg.num_directions, cfg.rank, generator=g, alpha=cfg.alpha,
        base_model=cfg.prep_config().base_model_id,
    )  # fmt: skip
    basis.metadata.update(config=json.dumps(cfg.training_dict(), sort_keys=True), identities=str(len(ids)))
    mod = BasisModule(basis, train_down=cfg.train_down).to(device)
    codes = torch.nn.Parameter((torch.randn(len(ids), cfg.num_directions, generator=g) * cfg.code_init_std).to(device))
    opt = _optimizer(mod, codes, cfg)
    start, metrics = 0, []
    if resume and (out / CKPT_NAME).is_file():
        t, meta = load_checkpoint(out / CKPT_NAME)
        if meta.get("identities") != ids:
            raise ValueError(f"{out}: the checkpoint was trained on other identities; use a new --out")
        mod.load_state_dict({k[len("basis.") :]: v for k, v in t.items() if k.startswith("basis.")})
        with torch.no_grad():
            codes.copy_(t["codes"])
        load_optimizer("opt", opt, t, meta["param_groups"])
        g.set_state(t["rng"])
        start = int(meta["step"])
        if start > cfg.steps:
            raise ValueError(f"{out}: the checkpoint is at step {start}, beyond --steps {cfg.steps}")
        metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        metrics = [m for m in metrics if m["step"] <= start]

    all_lat = torch.cat(lats)  # (ΣN, C, h, w)
    counts = torch.tensor([len(z) for z in lats])  # (I,)
    offsets = torch.cumsum(counts, 0) - counts  # (I,)
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    n_train = sched.config.num_train_timesteps
    bs = cfg.batch_size
    size = unet.config.sample_size * pipe.vae_scale_factor
    cond = unet_conditioning(pipe, cfg.caption, bs, size, size)
    params = [p for group in opt.param_groups for p in group["params"]]
    was_training = unet.training
    unet.train()
    bar = tqdm(total=cfg.steps, initial=start, desc="basis", unit="step", disable=not progress)
    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            who = torch.randint(len(ids), (bs,), generator=g)  # (B,) identity of each row
            pick = (torch.rand(bs, generator=g) * counts[who]).long()  # (B,) one of its latents
            x0, noise, t = draw_batch(all_lat, bs, n_train, g, device, idx=offsets[who] + pick)
            c = codes[who.to(device)]  # (B, K)
            with per_sample_adapters(unet, mod.per_sample(c)):
                loss = denoising_loss(unet, sched, x0, noise, t, cond)
            total = loss + cfg.code_reg * c.pow(2).sum(1).mean() if cfg.code_reg > 0 else loss
            opt.zero_grad(set_to_none=True)
            total.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            lv = float(loss.detach())
            if not np.isfinite(lv):
                raise FloatingPointError(f"basis training loss became {lv} at step {step + 1}")
            metrics.append({"step": step + 1, "loss": lv, "seconds": round(time.perf_counter() - t0, 4)})
            bar.update(1)
            bar.set_postfix(loss=f"{lv:.4f}")
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                _save_outputs(out, mod, codes, ids, metrics)
                ot, groups = optimizer_tensors("opt", opt)
                tensors = {**_state_tensors(mod, codes), **ot, "rng": g.get_state()}
                meta = {"step": step + 1, "param_groups": groups, "identities": ids}
                write_safetensors(out / CKPT_NAME, tensors, {"meta": json.dumps(meta)})  # read by ckpt.load_checkpoint
            if on_step is not None:
                on_step(step + 1, lv)
    finally:
        bar.close()
        unet.train(was_training)
    if start >= cfg.steps:  # resumed a finished run: outputs are already there
        _save_outputs(out, mod, codes, ids, metrics)
    losses = [m["loss"] for m in metrics]
    n = max(1, len(losses) // 10)
    summary = {
        "identities": len(ids),
        "photos": int(counts.sum()) // 2,
        "steps": cfg.steps,
        "loss_first": float(np.mean(losses[:n])) if losses else None,
        "loss_last": float(np.mean(losses[-n:])) if losses else None,
        "seconds_per_step": float(np.mean([m["seconds"] for m in metrics])) if metrics else None,
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "basis_params": mod.to_basis().num_params(),
    }
    _write_json(out / "summary.json", summary)
    return summary


def load_codes(out_dir: str | Path) -> tuple[list[str], torch.Tensor]:
    """``(identity ids, codes (I, K))`` of a ``data basis`` output folder."""
    t, meta = read_safetensors(Path(out_dir) / CODES_NAME)
    return json.loads(meta["identities"]), t["codes"]


# ---- fitting one identity's code (data build --method basis) ----------------------------------------------


def basis_file(path: str | Path) -> Path:
    """The basis file of ``--basis``: a ``data basis`` folder (its basis.safetensors) or the file itself."""
    p = Path(path).expanduser()
    return p / BASIS_NAME if p.is_dir() else p


@dataclass
class CodeFitResult(TrainResult):
    """One identity's fitted code (K,) and its exported LoRA (``adapter``), with the fit's losses and timings."""

    code: torch.Tensor = field(default_factory=lambda: torch.zeros(0))


def fit_code(
    pipe,
    crops: np.ndarray,
    cfg: BuildConfig,
    basis: IdentityBasis,
    *,
    prior: torch.Tensor | None = None,
    init: torch.Tensor | None = None,
    progress: bool = False,
) -> CodeFitResult:
    """Fit one identity's code to ``crops`` ((N, H, W, 3) uint8 aligned faces), the basis frozen, from c = 0 (or
    from ``init`` (K,): the hypernet's refine starts from its predicted code).

    The recipe's seed, steps, lr and batch (``adapter_train.optimise``); the UNet is never modified.
    """
    t0 = time.perf_counter()
    unet = pipe.unet
    g = torch.Generator("cpu").manual_seed(cfg.seed)
    latents = encode_latents(pipe, crops, g)  # (2N, C, h, w)
    frozen = IdentityBasis(
        basis.spec,
        {k: v.to(unet.device) for k, v in basis.down.items()},
        {k: v.to(unet.device) for k, v in basis.up.items()},
    )
    start = torch.zeros(basis.num_directions) if init is None else torch.as_tensor(init).detach().float().reshape(-1)
    if start.numel() != basis.num_directions:
        raise ValueError(f"init code has {start.numel()} values, the basis has K = {basis.num_directions}")
    code = start.clone().to(unet.device).requires_grad_(True)
    rows = torch.zeros(cfg.batch_size, dtype=torch.long)  # every row of a step is this identity

    def adapter():
        return per_sample_adapters(unet, basis_per_sample(frozen, code[None]), rows)

    was_training = unet.training
    unet.train()
    try:
        losses, step_seconds = optimise(
            pipe, latents, [code], cfg, g, adapter=adapter, prior=prior, progress=progress, desc="code"
        )
    finally:
        unet.train(was_training)
    c = code.detach().cpu()
    return CodeFitResult(basis_to_lora(basis, c), losses, time.perf_counter() - t0, step_seconds, c)


__all__ = [
    "BasisTrainConfig",
    "CodeFitResult",
    "basis_file",
    "fit_code",
    "load_codes",
    "prepare_training_set",
    "train_basis",
    "train_sources",
]
