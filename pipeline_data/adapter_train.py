"""Train one adapter on one identity's aligned crops (DreamBooth-style noise-prediction objective)."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from weights.adapter import Adapter
from weights.inject import inject_adapter, remove_adapter, trainable_parameters

from .recipe import BuildConfig


@dataclass
class TrainResult:
    """One identity's trained adapter and how training went."""

    adapter: Adapter
    losses: list[float] = field(default_factory=list)  # per-step training loss
    seconds: float = 0.0  # the whole call: latents, text conditioning, injection and the steps
    step_seconds: list[float] = field(default_factory=list)  # wall time of each optimisation step

    def loss_summary(self) -> dict[str, float]:
        n = max(1, len(self.losses) // 10)
        return {
            "first": float(np.mean(self.losses[:n])),
            "last": float(np.mean(self.losses[-n:])),
            "min": float(np.min(self.losses)),
            "steps": len(self.losses),
        }


def to_pixels(crops: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(crops)).to(device)
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@torch.no_grad()
def encode_latents(pipe, crops: np.ndarray, generator: torch.Generator, flip: bool = True) -> torch.Tensor:
    """VAE latents of the crops (and of their mirror images), scaled like the pipeline expects."""
    vae = pipe.vae
    x = to_pixels(crops, vae.device).to(vae.dtype)
    if flip:
        x = torch.cat([x, x.flip(-1)])
    out = []
    for chunk in x.split(16):
        dist = vae.encode(chunk).latent_dist
        out.append(dist.sample(generator=generator))
    z = torch.cat(out).float()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift) * vae.config.scaling_factor  # (2N, C, h, w)


@torch.no_grad()
def unet_conditioning(pipe, prompt: str, batch: int, height: int, width: int) -> dict[str, torch.Tensor]:
    """UNet keyword arguments for a prompt: SD 1.x text states, or SDXL's two encoders + added conditioning."""
    device = pipe.unet.device
    if hasattr(pipe, "text_encoder_2"):  # SDXL
        emb, _, pooled, _ = pipe.encode_prompt(
            prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        proj_dim = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else pooled.shape[-1]
        time_ids = pipe._get_add_time_ids(
            (height, width), (0, 0), (height, width), dtype=emb.dtype, text_encoder_projection_dim=proj_dim
        ).to(device)
        return {
            "encoder_hidden_states": emb.expand(batch, -1, -1),
            "added_cond_kwargs": {"text_embeds": pooled.expand(batch, -1), "time_ids": time_ids.expand(batch, -1)},
        }
    emb, _ = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    return {"encoder_hidden_states": emb.expand(batch, -1, -1)}


def _slice_cond(cond: dict, n: int) -> dict:
    out = {"encoder_hidden_states": cond["encoder_hidden_states"][:n]}
    if "added_cond_kwargs" in cond:
        out["added_cond_kwargs"] = {k: v[:n] for k, v in cond["added_cond_kwargs"].items()}
    return out


@torch.no_grad()
def prior_latents(pipe, cfg: BuildConfig, height: int, width: int) -> torch.Tensor:
    """Latents of base-model images of the class prompt (prior preservation), generated once per run."""
    g = torch.Generator("cpu").manual_seed(cfg.seed + 1)
    out = pipe(
        [cfg.class_prompt] * cfg.prior_images,
        height=height,
        width=width,
        num_inference_steps=cfg.check_steps,
        guidance_scale=cfg.check_guidance,
        generator=g,
        output_type="latent",
    ).images
    return out.float()


def draw_batch(
    latents: torch.Tensor, bs: int, n_train: int, g: torch.Generator, device, idx: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One denoising batch: latents x0 (``idx`` or ``bs`` drawn at random), noise like x0 and timesteps (bs,)."""
    if idx is None:
        idx = torch.randint(len(latents), (bs,), generator=g)
    x0 = latents[idx].to(device)
    noise = torch.randn(x0.shape, generator=g).to(device)
    t = torch.randint(0, n_train, (len(idx),), generator=g).to(device)
    return x0, noise, t


def denoising_loss(unet, sched, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """The recipe's DreamBooth objective: MSE between the UNet's noise prediction and the noise, in fp32."""
    pred = unet(sched.add_noise(x0, noise, t).to(unet.dtype), t, **cond).sample  # fp16/bf16 UNets too
    return F.mse_loss(pred.float(), noise.float())


def optimise(
    pipe,
    latents: torch.Tensor,
    params: list[torch.Tensor],
    cfg: BuildConfig,
    g: torch.Generator,
    *,
    adapter: Callable[[], AbstractContextManager] = nullcontext,
    prior: torch.Tensor | None = None,
    progress: bool = False,
    desc: str = "adapter",
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[list[float], list[float]]:
    """The recipe's optimisation of ``params`` on ``latents`` (2N, C, h, w): AdamW without weight decay, 5 % linear
    warm-up, gradient clipping at 1, ``cfg.steps`` steps of ``cfg.batch_size`` with the caption (and the prior loss).

    ``adapter()`` is entered around each step's forward passes (e.g. per-sample adapters built from the current
    params); with injected adapters it is a no-op. ``on_step(step, loss)`` is called after every step (an exception
    it raises stops the optimisation). Returns the per-step losses and seconds.
    """
    from tqdm.auto import tqdm

    unet = pipe.unet
    device = unet.device
    height, width = (latents.shape[-2] * pipe.vae_scale_factor, latents.shape[-1] * pipe.vae_scale_factor)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    n_train = sched.config.num_train_timesteps
    bs = cfg.batch_size
    cond = unet_conditioning(pipe, cfg.caption, bs, height, width)
    prior_cond = unet_conditioning(pipe, cfg.class_prompt, bs, height, width) if prior is not None else None
    warmup = max(1, cfg.steps // 20)
    lr_at = lambda s: min(1.0, (s + 1) / warmup)  # noqa: E731
    losses: list[float] = []
    step_seconds: list[float] = []
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    for step in tqdm(range(cfg.steps), disable=not progress, desc=desc, leave=False):
        t_step = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_at(step)
        with adapter():
            loss = denoising_loss(unet, sched, *draw_batch(latents, bs, n_train, g, device), cond)
            if prior is not None and cfg.prior_weight > 0:
                ploss = denoising_loss(
                    unet, sched, *draw_batch(prior, bs, n_train, g, device), _slice_cond(prior_cond, bs)
                )
                loss = loss + cfg.prior_weight * ploss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lv = float(loss.detach())
        if not np.isfinite(lv):
            raise FloatingPointError(f"training loss became {lv} at step {step}")
        losses.append(lv)
        step_seconds.append(time.perf_counter() - t_step)
        if on_step is not None:
            on_step(step, lv)
    return losses, step_seconds


def train_identity(
    pipe,
    crops: np.ndarray,
    cfg: BuildConfig,
    *,
    base_model: str,
    prior: torch.Tensor | None = None,
    progress: bool = False,
    init: Adapter | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Fit one adapter to ``crops`` ((N, H, W, 3) uint8 aligned faces) with the recipe's fixed seed and schedule.

    ``init``: start from this adapter (e.g. a hypernet's prediction; same method and layers) instead of the
    method's initialisation. ``on_step(step, loss)`` is called after every step (an exception it raises stops the
    training, the UNet is still restored). The UNet is modified only for the duration of the call (wrapped,
    trained, unwrapped).
    """
    t0 = time.perf_counter()
    want = cfg.adapter_spec(base_model)
    if init is not None:  # checked before any work
        init = init.to("cpu", torch.float32)
        if init.spec.method != want.method or init.spec.rank != want.rank:
            raise ValueError(
                f"the initial adapter is {init.spec.method} rank {init.spec.rank}, the recipe trains {want.method} "
                f"rank {want.rank}"
            )
    unet = pipe.unet
    g = torch.Generator("cpu").manual_seed(cfg.seed)
    latents = encode_latents(pipe, crops, g)  # (2N, C, h, w)
    was_training = unet.training
    spec = inject_adapter(unet, want, adapter=init, generator=torch.Generator("cpu").manual_seed(cfg.seed))
    try:  # from here on the adapter is removed whatever happens: the UNet is shared by every later identity
        unet.train()
        losses, step_seconds = optimise(
            pipe, latents, trainable_parameters(unet), cfg, g, prior=prior, progress=progress, on_step=on_step
        )
    finally:
        adapter = remove_adapter(unet)
        unet.train(was_training)
    adapter.spec = spec
    return TrainResult(adapter, losses, time.perf_counter() - t0, step_seconds)
