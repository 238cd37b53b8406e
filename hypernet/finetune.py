"""End-to-end fine-tune of a hypernet over identity-basis codes, in function space.

Each step draws identities (every usable photo of the shared faces, 1-3-photo people included, the eval split never),
samples their codes through the hypernet's own sampler (the shipped DDIM steps and CFG scale, autograd kept, fresh
starting noise), turns them into per-identity adapters with the frozen basis (shared A, B(c) = Σ c_k B_k) and
scores the adapted UNet on the identities' photos with the recipe's denoising loss — the rows of one UNet batch
mixing identities through the per-sample forward (``weights.per_sample``). A small weight loss (``code_weight``)
keeps the sampled latent near the identity's fitted code where a codes dataset provides one. Only the denoiser
learns; the basis, the UNet and the token statistics are frozen.

Output folder (``--out``): a basis predictor directory (:mod:`hypernet.basis_predict`, usable by ``difflora
predict`` and the service) plus ``finetune.json`` (the FinetuneConfig and where it started from), ``prepared/``
(the identities prepared once, as ``data basis`` does), ``state.safetensors`` (weights, optimizer, RNG, step: a
resumed run continues exactly), ``metrics.jsonl`` + ``metrics.png`` and ``summary.json``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline_data.cliargs import finite, positive
from weights.basis import IdentityBasis, basis_per_sample
from weights.per_sample import per_sample_adapters

from .basis_predict import BasisPredictor
from .code_autoencoder import codes_to_tokens, tokens_to_codes
from .data import sample_condition_subsets
from .strict_json import dumps

STATE_NAME = "state.safetensors"
CONFIG_NAME = "finetune.json"
METRICS_NAME = "metrics.jsonl"


@dataclass
class FinetuneConfig:
    """Options of ``difflora hypernet finetune`` (everything but the inputs and outputs)."""

    steps: int = 300  # optimisation steps
    identities: int = 4  # identities sampled through the hypernet per step
    batch_size: int = 8  # UNet rows per step (one photo latent each), shared out among the step's identities
    lr: float = 1e-4  # AdamW learning rate of the denoiser (constant after the warm-up)
    warmup_steps: int = 10  # linear learning-rate warm-up
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max global gradient norm (0: off)
    code_weight: float = 0.01  # weight of the code loss (diffusion-space MSE to the fitted code, where one exists)
    max_cond_photos: int = 8  # each identity is conditioned on a random subset of 1..min(P_i, this) photos
    sample_steps: int = 0  # DDIM steps of the sampler (0: the checkpoint's shipped setting)
    cfg_scale: float | None = None  # CFG scale of the sampler (None: the checkpoint's shipped setting)
    splits: str = "train"  # comma-separated identity splits trained on: train and/or val (never eval)
    seed: int = 0  # batches, photo subsets, sampler noise, diffusion noise and timesteps
    checkpoint_every: int = 50  # steps between resumable state writes (and predictor exports)

    def __post_init__(self) -> None:
        for name in ("steps", "identities", "batch_size", "max_cond_photos", "checkpoint_every"):
            positive(getattr(self, name), name)
        if self.warmup_steps < 0 or self.sample_steps < 0:
            raise ValueError(f"warmup_steps/sample_steps must be >= 0, got {self.warmup_steps}/{self.sample_steps}")
        finite(self.lr, "lr", lo=0.0)
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("weight_decay", "grad_clip", "code_weight"):
            finite(getattr(self, name), name, lo=0.0)
        finite(self.cfg_scale, "cfg_scale")
        if not self.split_names or set(self.split_names) - {"train", "val"}:
            raise ValueError(f"splits must be train and/or val (comma-separated; never eval), got {self.splits!r}")

    @property
    def split_names(self) -> tuple[str, ...]:
        return tuple(x.strip() for x in self.splits.split(",") if x.strip())

    @classmethod
    def from_dict(cls, d: dict[str, Any], strict: bool = False) -> FinetuneConfig:
        """From a dict (``strict``: an unknown field is a ValueError, else ignored)."""
        from .config import _checked

        names = {f.name for f in fields(cls)}
        if strict:
            _checked(cls, "finetune", d)  # unknown fields and wrong types, named
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class FinetuneData:
    """The prepared identities: records, VAE latents of their photos (and mirror images), face embeddings, codes."""

    records: list[dict]  # prepared identity records (pipeline_data.build.prepare_identity)
    latents: list[Tensor]  # per identity (2N_i, C, h, w)
    cond: list[Tensor]  # per identity (P_i, E) face embeddings of its photos
    codes: dict[int, Tensor]  # identity index -> fitted code (K,), where the codes dataset has one

    @property
    def ids(self) -> list[str]:
        return [r["identity"] for r in self.records]


def identity_sources(faces_dirs: Sequence[str | Path], splits: Sequence[str], limit: int | None = None) -> list:
    """The identity folders of ``splits`` under ``faces_dirs`` (``build.discover``), the first ``limit``."""
    from pipeline_data.build import discover
    from pipeline_data.splits import split_of

    positive(limit, "limit")
    sources = [s for s in discover(faces_dirs) if split_of(s.dataset, s.name) in splits]
    if not sources:
        raise ValueError(
            f"no {'/'.join(splits)}-split identity folders with photos in {', '.join(map(str, faces_dirs))}"
        )
    return sources[:limit]


def basis_train_config(basis: IdentityBasis, predictor: BasisPredictor, device: str):
    """The ``data basis`` config the basis was trained with (its metadata), for preparing photos the same way."""
    from pipeline_data.basis_train import BasisTrainConfig

    raw = basis.metadata.get("config")
    d = json.loads(raw) if raw else {"base": predictor.base, "face_backend": predictor.face_backend}
    return BasisTrainConfig.from_dict({**d, "device": device, "threads": 0})


class Finetuner:
    """One fine-tune run (see the module docstring): ``run()`` trains, resuming from ``out`` when it holds state."""

    def __init__(
        self,
        checkpoint: str | Path,
        faces_dirs: Sequence[str | Path],
        out_dir: str | Path,
        cfg: FinetuneConfig | None = None,
        *,
        dataset: str | Path | None = None,
        limit: int | None = None,
        device: str = "cpu",
        progress: bool = True,
    ) -> None:
        self.cfg = cfg or FinetuneConfig()
        self.checkpoint, self.out, self.progress = Path(checkpoint), Path(out_dir), progress
        self.predictor = BasisPredictor.load(self.checkpoint, device)
        self.sources = identity_sources(faces_dirs, self.cfg.split_names, limit)  # bad inputs fail before any write
        self.dataset, self.limit = dataset, limit
        self.prep = basis_train_config(self.predictor.basis, self.predictor, device)
        self.pipe = None  # the base pipeline (prepare() loads it, as the data build does)
        self.step = 0
        self.metrics: list[dict] = []

    # ------------------------------------------------------------------ data
    def prepare(self) -> FinetuneData:
        """Prepare (or read back) every identity, as ``data basis`` prepares its training set."""
        from pipeline_data.basis_train import prepare_training_set
        from pipeline_data.build import _worker_state

        recs, lats = prepare_training_set(self.sources, self.out, self.prep, progress=self.progress)
        self.pipe = _worker_state(self.prep.prep_config())[0]
        cond = [torch.tensor(r["embeddings"], dtype=torch.float32) for r in recs]
        codes: dict[int, Tensor] = {}
        if self.dataset is not None:
            from .code_data import load_code_dataset

            ds = load_code_dataset(self.dataset)
            if ds.basis.fingerprint() != self.predictor.basis.fingerprint():
                raise ValueError(f"{self.dataset}: its codes live in another basis than the checkpoint's")
            row = {n: i for i, n in enumerate(ds.data.names)}
            codes = {i: ds.codes[row[r["identity"]]] for i, r in enumerate(recs) if r["identity"] in row}
        return FinetuneData(recs, lats, cond, codes)

    # ------------------------------------------------------------------ one step
    def _setup(self) -> None:
        from diffusers import DDPMScheduler

        from pipeline_data.adapter_train import unet_conditioning

        self.data = self.prepare()
        pipe, hn = self.pipe, self.predictor.hypernet
        unet = pipe.unet
        unet.requires_grad_(False)
        self.device = unet.device
        b = self.predictor.basis
        self.frozen = IdentityBasis(
            b.spec, {k: v.to(self.device) for k, v in b.down.items()}, {k: v.to(self.device) for k, v in b.up.items()}
        )
        self.sched = DDPMScheduler.from_config(pipe.scheduler.config)
        size = unet.config.sample_size * pipe.vae_scale_factor
        self.unet_cond = unet_conditioning(pipe, self.prep.caption, self.cfg.batch_size, size, size)
        model = hn.model
        model.requires_grad_(False)
        model.denoiser.requires_grad_(True)
        self.params = list(model.denoiser.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.gen = torch.Generator().manual_seed(self.cfg.seed)
        self.steps = self.cfg.sample_steps or self.predictor.steps
        self.cfg_scale = self.predictor.cfg_scale if self.cfg.cfg_scale is None else self.cfg.cfg_scale

    def sample_codes(self, conds: list[Tensor], noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(codes (B, K), diffusion-space latents (B, T, D)) of B condition sets, autograd kept."""
        hn = self.predictor.hypernet
        zn = hn.sample_latents(conds, steps=self.steps, cfg_scale=self.cfg_scale, noise=noise)  # (B, T, D)
        return tokens_to_codes(hn.model.decode_raw(zn), self.predictor.num_directions), zn

    def _loss(self) -> tuple[Tensor, dict[str, float]]:
        from pipeline_data.adapter_train import denoising_loss, draw_batch

        cfg, g, data = self.cfg, self.gen, self.data
        n = min(cfg.identities, len(data.records))
        who = torch.randperm(len(data.records), generator=g)[:n]  # (n,) the step's identities
        conds = sample_condition_subsets([data.cond[i] for i in who.tolist()], cfg.max_cond_photos, g)
        noise = torch.randn((n, *self.predictor.hypernet.model.cfg.autoencoder.latent_shape), generator=g)
        codes, zn = self.sample_codes(conds, noise)  # (n, K), (n, T, D)
        rows = torch.arange(cfg.batch_size) % n  # (B,) UNet row -> which of the step's identities
        lat = [data.latents[int(who[r])] for r in rows.tolist()]
        pick = torch.stack([torch.randint(len(z), (1,), generator=g)[0] for z in lat])
        x0 = torch.stack([z[int(k)] for z, k in zip(lat, pick, strict=True)])  # (B, C, h, w)
        x0, eps, t = draw_batch(x0, cfg.batch_size, self.sched.config.num_train_timesteps, g, self.device,
                                idx=torch.arange(cfg.batch_size))  # fmt: skip
        with per_sample_adapters(self.pipe.unet, basis_per_sample(self.frozen, codes), rows.to(self.device)):
            dn_loss = denoising_loss(self.pipe.unet, self.sched, x0, eps, t, self.unet_cond)
        have = [j for j, i in enumerate(who.tolist()) if i in data.codes]
        code_loss = torch.zeros((), device=zn.device)
        if have and cfg.code_weight > 0:
            model = self.predictor.hypernet.model
            target = torch.stack([data.codes[int(who[j])] for j in have]).to(zn.device)  # (h, K)
            T, D = model.cfg.autoencoder.num_tokens, model.cfg.autoencoder.token_dim
            with torch.no_grad():
                z_target = model.encode_raw(codes_to_tokens(target, T, D))  # (h, T, D)
            code_loss = ((zn[have] - z_target) ** 2 * model.mask).sum() / (model.mask.sum() * len(have))
        loss = dn_loss + cfg.code_weight * code_loss
        return loss, {"denoise_loss": float(dn_loss.detach()), "code_loss": float(code_loss.detach())}

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        lr = cfg.lr * min(1.0, (self.step + 1) / max(1, cfg.warmup_steps))
        for group in self.opt.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        loss, parts = self._loss()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        self.opt.step()
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise FloatingPointError(f"fine-tune loss became {lv} at step {self.step + 1}")
        self.step += 1
        return {"step": self.step, "loss": lv, **parts, "lr": lr, "grad_norm": float(gn),
                "seconds": round(time.perf_counter() - t0, 4)}  # fmt: skip

    # ------------------------------------------------------------------ fixed-noise measure
    @torch.no_grad()
    def photo_loss(self, seed: int = 1234, timesteps: int = 4) -> float:
        """Denoising loss of every prepared identity's predicted adapter (the predictor's shipped sampling: seed 0,
        all its photos) on its photos at fixed noise and timesteps — comparable across steps."""
        from pipeline_data.adapter_train import denoising_loss, unet_conditioning

        hn, data = self.predictor.hypernet, self.data
        size = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        was = hn.model.training
        hn.model.eval()
        codes = self.predictor.predict_codes(data.cond).to(self.device)  # (I, K)
        hn.model.train(was)
        g = torch.Generator().manual_seed(seed)
        n_train = self.sched.config.num_train_timesteps
        total, count = 0.0, 0
        for i, lat in enumerate(data.latents):
            x0 = lat.repeat(timesteps, 1, 1, 1).to(self.device)  # (timesteps * 2N, C, h, w)
            eps = torch.randn(x0.shape, generator=g).to(self.device)
            t = torch.randint(0, n_train, (len(x0),), generator=g).to(self.device)
            cond = unet_conditioning(self.pipe, self.prep.caption, len(x0), size, size)
            with per_sample_adapters(self.pipe.unet, basis_per_sample(self.frozen, codes[i : i + 1]),
                                     torch.zeros(len(x0), dtype=torch.long, device=self.device)):  # fmt: skip
                total += float(denoising_loss(self.pipe.unet, self.sched, x0, eps, t, cond)) * len(x0)
            count += len(x0)
        return total / count

    # ------------------------------------------------------------------ state
    def _save_state(self) -> None:
        from pipeline_data.tiny.ckpt import optimizer_tensors, save_checkpoint

        ot, groups = optimizer_tensors("opt", self.opt)
        dn = {f"denoiser.{k}": v for k, v in self.predictor.hypernet.model.denoiser.state_dict().items()}
        save_checkpoint(self.out / STATE_NAME, {**dn, **ot, "rng": self.gen.get_state()},
                        {"step": self.step, "param_groups": groups, "identities": self.data.ids})  # fmt: skip
        self._export()

    def _load_state(self) -> bool:
        from pipeline_data.tiny.ckpt import load_checkpoint, load_module, load_optimizer

        path = self.out / STATE_NAME
        if not path.is_file():
            return False
        t, meta = load_checkpoint(path)
        if meta.get("identities") != self.data.ids:
            raise ValueError(f"{self.out}: its state was fine-tuned on other identities; use a new --out")
        load_module("denoiser", self.predictor.hypernet.model.denoiser, t)
        load_optimizer("opt", self.opt, t, meta["param_groups"])
        self.gen.set_state(t["rng"])
        self.step = int(meta["step"])
        lines = (self.out / METRICS_NAME).read_text().splitlines() if (self.out / METRICS_NAME).is_file() else []
        self.metrics = [m for m in map(json.loads, filter(str.strip, lines)) if m["step"] <= self.step]
        return True

    def _export(self) -> None:
        from weights.safetensors_io import atomic_write_bytes

        from .checkpoint import MODEL_NAME, atomic_save_tensors, state_to_tensors
        from .predict import RECIPE_NAME

        self.predictor.save(self.out)  # config.json, ema.safetensors, basis, code layout
        atomic_save_tensors(state_to_tensors(self.predictor.hypernet.model.state_dict()), self.out / MODEL_NAME)
        if (self.checkpoint / RECIPE_NAME).is_file() and self.checkpoint.resolve() != self.out.resolve():
            shutil.copyfile(self.checkpoint / RECIPE_NAME, self.out / RECIPE_NAME)
        text = "".join(dumps(m) + "\n" for m in self.metrics)
        atomic_write_bytes(self.out / METRICS_NAME, text.encode())

    def _check_out(self, resume: bool) -> None:
        from weights.safetensors_io import atomic_write_bytes

        path = self.out / CONFIG_NAME
        mine = {"config": asdict(self.cfg), "checkpoint": str(self.checkpoint.resolve()), "limit": self.limit}
        if path.is_file():
            old = json.loads(path.read_text())
            if {k: old.get(k) for k in mine} != json.loads(dumps(mine)):
                raise ValueError(
                    f"{self.out} holds a fine-tune with other options or another checkpoint; use a new --out"
                )
        if (self.out / STATE_NAME).is_file() and not resume:
            raise ValueError(f"{self.out} holds a fine-tune state: pass --resume to continue it, or use a new --out")
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, (dumps(mine, indent=2, sort_keys=True) + "\n").encode())

    # ------------------------------------------------------------------ loop
    def run(self, *, resume: bool = False, on_step: Callable[[int, float], None] | None = None) -> dict:
        """Fine-tune to ``cfg.steps``; returns the summary (also ``summary.json``)."""
        from tqdm.auto import tqdm

        from weights.safetensors_io import atomic_write_bytes

        self._check_out(resume)
        t_start = time.perf_counter()
        self._setup()
        if resume:
            self._load_state()
        unet = self.pipe.unet
        was_training = unet.training
        unet.train()
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc="finetune", unit="step", disable=not self.progress)
        try:
            while self.step < self.cfg.steps:
                rec = self.train_step()
                self.metrics.append(rec)
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
                if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps:
                    self._save_state()
                if on_step is not None:
                    on_step(self.step, rec["loss"])
        finally:
            bar.close()
            unet.train(was_training)
        if not self.metrics or self.metrics[-1]["step"] != self.step or not (self.out / "ema.safetensors").is_file():
            self._save_state()
        _plot(self.out)
        losses = [m["denoise_loss"] for m in self.metrics]
        k = max(1, len(losses) // 10)
        summary = {
            "identities": len(self.data.records), "with_codes": len(self.data.codes),
            "photos": int(sum(len(z) for z in self.data.latents)) // 2, "steps": self.step,
            "denoise_loss_first": float(np.mean(losses[:k])) if losses else None,
            "denoise_loss_last": float(np.mean(losses[-k:])) if losses else None,
            "seconds_per_step": float(np.mean([m["seconds"] for m in self.metrics])) if self.metrics else None,
            "wall_seconds": round(time.perf_counter() - t_start, 1),
        }  # fmt: skip
        atomic_write_bytes(self.out / "summary.json", (dumps(summary, indent=2, sort_keys=True) + "\n").encode())
        return summary


def _plot(out: Path) -> None:
    from pipeline_data.plots import plot_loss

    recs = [json.loads(ln) for ln in (out / METRICS_NAME).read_text().splitlines() if ln.strip()]
    plot_loss([r["step"] for r in recs], [r["denoise_loss"] for r in recs], out / "metrics.png", "hypernet fine-tune")


def finetune(
    checkpoint: str | Path,
    faces_dirs: Sequence[str | Path],
    out_dir: str | Path,
    cfg: FinetuneConfig | None = None,
    *,
    resume: bool = False,
    **kw: Any,
) -> dict:
    """Fine-tune the basis hypernet at ``checkpoint`` on the photos of ``faces_dirs`` into ``out_dir`` (see the
    module docstring); ``kw``: :class:`Finetuner`'s options (``dataset``: the codes dataset whose fitted codes the
    small code loss pulls towards; ``limit``, ``device``, ``progress``)."""
    return Finetuner(checkpoint, faces_dirs, out_dir, cfg, **kw).run(resume=resume)
