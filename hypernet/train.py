"""Two-stage training of the hypernetwork, resumable, with EMA, metrics (JSONL + PNG) and safetensors checkpoints.

Stage 1 (``ae_steps``): the weight autoencoder reconstructs normalised adapter tokens (magnitude-weighted masked
MSE, noise on input and latent). At the switch its EMA weights become its weights, it is frozen, and the
latent statistics of the training adapters are fitted. Stage 2 (``dn_steps``): the denoiser learns the
latents given random subsets of each identity's photos (condition dropout for CFG). Sequential rather than
joint training keeps the denoiser's target fixed, as for latent diffusion.

All randomness of a step (batch, photo subsets, noise, timesteps, dropout) comes from one generator whose state
is checkpointed, so a resumed run continues exactly like an uninterrupted one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pipeline_data.cliargs import resolve_device
from weights.atomic import atomic_write_text

from .autoencoder import magnitude_weight, reconstruction_loss
from .checkpoint import (
    EMA_NAME,
    MODEL_NAME,
    atomic_save_tensors,
    load_config,
    load_state,
    save_config,
    state_to_tensors,
)
from .config import HypernetConfig
from .data import HypernetDataset, fit_token_stats, mean_embedding, pad_conditions, sample_condition_subsets
from .linear_autoencoder import LinearAutoencoder
from .metrics import summarize, weight_metrics
from .model import HypernetModel
from .plots import plot_metrics
from .sample import Hypernet
from .strict_json import dumps

OPTIMIZER_NAME = "optimizer.safetensors"
STATE_NAME = "trainer_state.json"
METRICS_NAME = "metrics.jsonl"
CKPT_DIR = "checkpoints"


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up then cosine decay to ``min_ratio * peak``; ``step`` counts within the stage."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def optimizer_tensors(opt: torch.optim.Optimizer, named: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    """AdamW state as flat tensors keyed ``state.<param name>.<field>`` (safetensors, no pickle)."""
    name_of = {id(p): n for n, p in named.items()}
    return {f"state.{name_of[id(p)]}.{k}": torch.as_tensor(v) for p, st in opt.state.items() for k, v in st.items()}


def load_optimizer_tensors(opt: torch.optim.Optimizer, named: dict[str, nn.Parameter], t: dict[str, Tensor]) -> None:
    for n, p in named.items():
        prefix = f"state.{n}."
        st = {k[len(prefix) :]: v for k, v in t.items() if k.startswith(prefix)}
        if st:  # AdamW keeps 'step' on the CPU, moments on the parameter's device
            opt.state[p] = {k: (v if k == "step" else v.to(p.device)) for k, v in st.items()}


class Trainer:
    def __init__(
        self,
        cfg: HypernetConfig,
        train_set: HypernetDataset,
        out_dir: str | Path,
        val_set: HypernetDataset | None = None,
        device: str = "auto",
        progress: bool = True,
    ) -> None:
        cfg = cfg.for_data(train_set.num_tokens, train_set.token_dim, train_set.num_layers, train_set.cond_dim)
        if cfg.autoencoder.kind in ("linear", "basis"):  # fitted in closed form below / nothing to fit: no steps
            cfg = replace(cfg, train=replace(cfg.train, ae_steps=0))
        self.cfg = cfg
        self.train_set, self.val_set = train_set, val_set
        self.out = Path(out_dir)
        self.device = resolve_device(device)
        self.progress = progress
        tc = self.cfg.train
        amp = tc.amp == "bf16" or (tc.amp == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported())
        self.amp = amp
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(tc.seed)
            model = HypernetModel(self.cfg)
        model.set_layout(train_set.layer_ids, train_set.mask)
        model.set_token_stats(*fit_token_stats(train_set.tokens, train_set.mask))
        self.ae_fit: dict[str, float] = {}
        # the linear autoencoder is fitted in closed form when the run starts (run), unless resume loads it
        self._fit_pending = isinstance(model.autoencoder, LinearAutoencoder)
        self.model = model.to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.diffusion = self.model.diffusion()
        self.tokens = train_set.tokens.to(self.device)  # (N, T, D) raw
        self.gen = torch.Generator().manual_seed(tc.seed + 1)
        self.step, self.ae_done, self.latents = 0, False, None
        if cfg.autoencoder.kind == "basis":  # the codes are the latents: straight to the denoiser
            self._finish_autoencoder()
        elif not self._fit_pending:
            self.opt = self._make_optimizer()

    def _fit_linear_autoencoder(self) -> None:
        """Stage 1 of the linear kind: the closed-form fit (nothing to train), then straight to the denoiser."""
        ae = self.model.autoencoder
        self.ae_fit = ae.fit(
            self.model.normalize_tokens(self.tokens), mean_embedding(self.train_set.cond).to(self.device),
            self.train_set.mask.to(self.device), self.cfg.autoencoder.ridge,
        )  # fmt: skip
        self.ema.autoencoder.load_state_dict(ae.state_dict())
        self._fit_pending = False
        self._finish_autoencoder()

    @property
    def data_fingerprint(self) -> str:
        """Hash of the training identities and token shape: a resumed run must train on the same data."""
        h = hashlib.sha256(json.dumps([sorted(self.train_set.names), list(self.train_set.tokens.shape)]).encode())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------ stages

    @property
    def stage(self) -> str:
        """The autoencoder stage lasts until the first step after ``ae_steps`` switches (``_finish_autoencoder``)."""
        return "denoiser" if self.ae_done else "autoencoder"

    def _stage_module(self, model: HypernetModel) -> nn.Module:
        return model.autoencoder if self.stage == "autoencoder" else model.denoiser

    def _named_params(self) -> dict[str, nn.Parameter]:
        return dict(self._stage_module(self.model).named_parameters())

    def _make_optimizer(self) -> torch.optim.Optimizer:
        tc = self.cfg.train
        self.model.requires_grad_(False)
        self._stage_module(self.model).requires_grad_(True)
        lr = tc.ae_lr if self.stage == "autoencoder" else tc.dn_lr
        return torch.optim.AdamW(self._named_params().values(), lr=lr, betas=tc.betas, weight_decay=tc.weight_decay)

    def _train_latents(self) -> Tensor:
        """Diffusion-space latents of the training adapters (N, T_lat, D_lat), from the frozen autoencoder."""
        with torch.no_grad():
            return torch.cat(
                [self.model.encode_raw(self.tokens[i : i + 256]) for i in range(0, len(self.tokens), 256)]
            )

    def _finish_autoencoder(self) -> None:
        """Stage switch: EMA autoencoder -> autoencoder, freeze it, fit latent statistics, new optimiser."""
        self.model.autoencoder.load_state_dict(self.ema.autoencoder.state_dict())
        self.model.fit_latent_stats(self.tokens)
        self.ema.latent_mean.copy_(self.model.latent_mean)
        self.ema.latent_std.copy_(self.model.latent_std)
        self.latents = self._train_latents()
        self.ae_done = True
        self.opt = self._make_optimizer()

    # ------------------------------------------------------------------ one step

    def _loss(self) -> Tensor:
        tc, B, g = self.cfg.train, self.cfg.train.batch_size, self.gen
        idx = torch.randint(len(self.tokens), (B,), generator=g)
        if self.stage == "autoencoder":
            raw = self.tokens[idx.to(self.device)]  # (B, T, D)
            xn = self.model.normalize_tokens(raw)
            w = magnitude_weight(raw, self.model.token_scale, self.cfg.autoencoder.magnitude_weight)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                pred = self.model.autoencoder(xn, generator=g)  # (B, T, D)
            return reconstruction_loss(pred, xn, w, self.model.mask)
        x0 = self.latents[idx.to(self.device)]  # (B, T_lat, D_lat)
        conds = sample_condition_subsets([self.train_set.cond[i] for i in idx.tolist()], tc.max_cond_photos, g)
        cond, cmask = (t.to(self.device) for t in pad_conditions(conds))  # (B, P, E), (B, P)
        drop = (torch.rand(B, generator=g) < self.cfg.denoiser.cond_drop_prob).to(self.device)
        t = torch.randint(self.diffusion.num_timesteps, (B,), generator=g).to(self.device)
        noise = torch.randn(x0.shape, generator=g).to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return self.diffusion.training_loss(
                lambda x, tt: self.model.denoiser(x, tt, cond, cmask, drop), x0, t, noise
            )

    def train_step(self) -> dict[str, float]:
        tc = self.cfg.train
        if self._fit_pending:  # run() does this first; a caller stepping by hand gets it too
            self._fit_linear_autoencoder()
        if self.step >= tc.ae_steps and not self.ae_done:
            self._finish_autoencoder()
        ae = self.stage == "autoencoder"
        s, total = (self.step, tc.ae_steps) if ae else (self.step - tc.ae_steps, tc.dn_steps)
        lr = lr_at(s, total, tc.ae_lr if ae else tc.dn_lr, tc.warmup_steps, tc.min_lr_ratio)
        for group in self.opt.param_groups:
            group["lr"] = lr
        loss = self._loss()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        params = list(self._named_params().values())
        gn = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        self.opt.step()
        decay = min(tc.ema_decay, (1 + s) / (10 + s))
        with torch.no_grad():
            for p_ema, p in zip(self._stage_module(self.ema).parameters(), params, strict=True):
                p_ema.lerp_(p, 1 - decay)
        self.step += 1
        return {"loss": float(loss.detach()), "lr": lr, "grad_norm": float(gn)}

    # ------------------------------------------------------------------ evaluation (EMA model)

    @torch.no_grad()
    def validate(self, final: bool = False) -> dict[str, float]:
        ds = self.val_set if self.val_set is not None else self.train_set.subset(range(min(256, len(self.train_set))))
        raw = ds.tokens.to(self.device)  # (M, T, D)
        ema, out = self.ema, {}
        if not self.ae_done or final or (self.ae_fit and self.step == 0):  # autoencoder reconstruction
            rec = ema.denormalize_tokens(ema.autoencoder.decode(ema.autoencoder.encode(ema.normalize_tokens(raw))))
            s = summarize(weight_metrics(rec.cpu(), raw.cpu(), ds.mask, ema.token_mean.cpu()))
            out |= {"val_ae_rel_mse": s["rel_mse"], "val_ae_cosine": s["cosine"]}
        if self.ae_done:
            g = torch.Generator().manual_seed(12345)  # fixed noise and timesteps: comparable across steps
            x0 = ema.encode_raw(raw)
            t = torch.randint(self.diffusion.num_timesteps, (len(ds),), generator=g).to(self.device)
            noise = torch.randn(x0.shape, generator=g).to(self.device)
            cond, cmask = (c.to(self.device) for c in pad_conditions(ds.cond))
            out["val_dn_loss"] = float(
                self.diffusion.training_loss(lambda x, tt: ema.denoiser(x, tt, cond, cmask), x0, t, noise)
            )
        if final and self.ae_done:
            s = self.cfg.sampling
            pred = Hypernet(ema, self.device).predict_tokens(
                ds.cond, steps=s.steps, cfg_scale=s.cfg_scale, samples=s.samples
            )
            s = summarize(weight_metrics(pred, ds.tokens, ds.mask, ema.token_mean.cpu()))
            out |= {f"val_{k}": v for k, v in s.items()}
        return out

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        ckpts = self.out / CKPT_DIR
        ckpts.mkdir(parents=True, exist_ok=True)
        final = ckpts / f"step_{self.step:08d}"
        tmp = ckpts / f".step_{self.step:08d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        self.export(tmp)
        opt_t = optimizer_tensors(self.opt, self._named_params()) | {"rng.train": self.gen.get_state()}
        atomic_save_tensors(opt_t, tmp / OPTIMIZER_NAME)
        state = {
            "step": self.step, "stage": self.stage, "ae_done": self.ae_done, "data": self.data_fingerprint,
            "ae_fit": self.ae_fit,
        }  # fmt: skip
        atomic_write_text(tmp / STATE_NAME, dumps(state, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.replace(final)
        atomic_write_text(ckpts / "latest", final.name + "\n")
        for old in sorted(ckpts.glob("step_*"))[: -self.cfg.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def export(self, directory: Path) -> None:
        """Write the inference files (config.json, model.safetensors, ema.safetensors) into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"step": str(self.step), "format": "difflora-hypernet"}
        atomic_save_tensors(state_to_tensors(self.model.state_dict()), directory / MODEL_NAME, meta)
        atomic_save_tensors(state_to_tensors(self.ema.state_dict()), directory / EMA_NAME, meta)
        save_config(self.cfg, directory, {"step": self.step})

    def resume(self) -> bool:
        """Continue from ``out_dir/checkpoints/latest`` if it exists. Returns whether a checkpoint was loaded."""
        pointer = self.out / CKPT_DIR / "latest"
        if not pointer.is_file():
            return False
        ckpt = self.out / CKPT_DIR / pointer.read_text().strip()
        saved = load_config(ckpt)
        for section in ("autoencoder", "denoiser"):
            if getattr(saved, section) != getattr(self.cfg, section):
                raise ValueError(f"{ckpt}: its {section} config differs from this run's; use a new --out directory")
        state = json.loads((ckpt / STATE_NAME).read_text())
        if state.get("data", self.data_fingerprint) != self.data_fingerprint:  # checkpoints before the field: trusted
            raise ValueError(
                f"{ckpt} was trained on other identities than this run's {len(self.train_set)}; "
                "use a new --out directory"
            )
        self.model.load_state_dict(load_state(ckpt / MODEL_NAME, self.device))
        self.ema.load_state_dict(load_state(ckpt / EMA_NAME, self.device))
        self.step, self.ae_done = int(state["step"]), bool(state["ae_done"])
        self.ae_fit, self._fit_pending = state.get("ae_fit", {}), False  # the checkpoint holds the fitted basis
        self.opt = self._make_optimizer()
        t = load_state(ckpt / OPTIMIZER_NAME)
        self.gen.set_state(t.pop("rng.train"))
        load_optimizer_tensors(self.opt, self._named_params(), t)
        if self.ae_done:
            self.latents = self._train_latents()
        return True

    # ------------------------------------------------------------------ loop

    def _truncate_metrics(self) -> None:
        path = self.out / METRICS_NAME
        if path.is_file():
            recs = [(ln, json.loads(ln)) for ln in path.read_text().splitlines() if ln.strip()]
            keep = [ln for ln, r in recs if r["step"] <= self.step and r["stage"] != "final"]
            atomic_write_text(path, "".join(ln + "\n" for ln in keep))

    def _log(self, record: dict[str, Any]) -> None:
        with open(self.out / METRICS_NAME, "a") as f:
            f.write(dumps(record) + "\n")

    def run(self, stop_after: int | None = None) -> dict[str, float]:
        """Train up to ``cfg.train.total_steps`` (or ``stop_after`` steps, to simulate an interruption).

        Returns the final validation metrics (empty if stopped early)."""
        tc = self.cfg.train
        self.out.mkdir(parents=True, exist_ok=True)
        self._truncate_metrics()
        end = tc.total_steps if stop_after is None else min(tc.total_steps, stop_after)
        if self._fit_pending:
            self._fit_linear_autoencoder()
        if self.step == 0 and self.ae_fit:
            self._log({"step": 0, "stage": "autoencoder", **self.ae_fit, **self.validate()})
        bar = tqdm(total=tc.total_steps, initial=self.step, disable=not self.progress, desc="hypernet", leave=False)
        t0 = time.perf_counter()
        while self.step < end:
            rec = self.train_step()
            bar.update(1)
            bar.set_postfix(stage=self.stage[:2], loss=f"{rec['loss']:.4f}")
            if self.step % tc.log_every == 0:
                self._log({"step": self.step, "stage": self.stage, **rec, "elapsed_s": time.perf_counter() - t0})
            if self.step % tc.eval_every == 0 or self.step == tc.ae_steps:
                self._log({"step": self.step, "stage": self.stage, **self.validate()})
            if self.step % tc.ckpt_every == 0 and self.step < end:
                self.save_checkpoint()
        bar.close()
        if self.step < tc.total_steps:
            self.save_checkpoint()
            return {}
        if not self.ae_done:  # dn_steps == 0: still finish the autoencoder so the export is usable
            self._finish_autoencoder()
        final = self.ae_fit | self.validate(final=True)
        self._log({"step": self.step, "stage": "final", **final})
        self.save_checkpoint()
        self.export(self.out)
        atomic_write_text(self.out / "summary.json", dumps(final, indent=2, sort_keys=True) + "\n")
        plot_metrics(self.out / METRICS_NAME, self.out / "metrics.png")
        return final


def train(
    cfg: HypernetConfig,
    train_set: HypernetDataset,
    out_dir: str | Path,
    val_set: HypernetDataset | None = None,
    device: str = "auto",
    resume: bool = True,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Train, resuming from ``out_dir``'s latest checkpoint when ``resume`` (else deleting its checkpoints).

    The exported model lands in ``out_dir``; returns the final validation metrics ({} if stopped early)."""
    trainer = Trainer(cfg, train_set, out_dir, val_set=val_set, device=device, progress=progress)
    if resume:
        trainer.resume()
    else:  # start over: earlier checkpoints of this directory would be mistaken for this run's
        shutil.rmtree(trainer.out / CKPT_DIR, ignore_errors=True)
    return trainer.run(stop_after=stop_after)
