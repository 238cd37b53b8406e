"""Train the tiny base model: VAE, then UNet + small CLIP text encoder; export a diffusers folder.

Stages (each resumable from the work directory):
1. crops     aligned 64x64 face crops of the non-eval identities (cached, ``crops.py``)
2. vae       AutoencoderKL, L1 + edge + small KL; then per-channel latent mean/std folded into its weights
3. latents   posterior mean/std of every crop and its mirror image under the folded VAE
4. unet      UNet + text encoder, epsilon prediction, Min-SNR weighting, caption dropout, EMA
5. export    fp16 StableDiffusionPipeline folder (DDIM scheduler) written atomically
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline_data.tiny.arch import (
    SCHEDULER_KW,
    TinyConfig,
    build_text_encoder,
    build_unet,
    build_vae,
    fold_latent_normalisation,
)
from pipeline_data.tiny.ckpt import (
    load_checkpoint,
    load_module,
    load_optimizer,
    module_tensors,
    optimizer_tensors,
    save_checkpoint,
)
from pipeline_data.tiny.crops import build_crops
from pipeline_data.tiny.export import export_pipeline
from pipeline_data.tiny.folders import check_out_dir, prepare_work_dir
from pipeline_data.tiny.tokenizer import load_tokenizer, write_tokenizer
from weights.safetensors_io import atomic_write_bytes

COLOUR_CAPTIONS = (
    "a photo of a person",
    "a portrait photo of a person",
    "a close up photo of a person",
    "a photo of a face",
    "a headshot of a person",
)
GREY_CAPTIONS = ("a black and white photo of a person", "a black and white portrait of a person")


def _log(work: Path, record: dict) -> None:
    with open(work / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))


def _to_tensor(crops: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(crops).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # (N, 3, S, S) in [-1, 1]


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.clamp(-1, 1) - b) / 2).pow(2).mean().item()
    return 10 * math.log10(1.0 / max(mse, 1e-10))


# ----------------------------------------------------------------------------------------------------- VAE


def train_vae(cfg: TinyConfig, images: torch.Tensor, val: torch.Tensor, work: Path, progress: bool = True):
    """Train (or resume) the VAE; returns the folded VAE, also saved to ``work/vae``."""
    from diffusers import AutoencoderKL

    final = work / "vae"
    if (final / "config.json").is_file():
        return AutoencoderKL.from_pretrained(str(final))
    vc = cfg.vae
    torch.manual_seed(cfg.seed)
    vae = build_vae(vc, cfg.crop_size)
    opt = torch.optim.AdamW(vae.parameters(), lr=vc.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    step, elapsed = 0, 0.0
    ck = work / "vae_ckpt.safetensors"
    if ck.is_file():
        t, meta = load_checkpoint(ck)
        load_module("vae", vae, t)
        load_optimizer("opt", opt, t, meta["param_groups"])
        gen.set_state(t["rng"])
        step, elapsed = meta["step"], meta["elapsed"]

    def save() -> None:
        ot, groups = optimizer_tensors("opt", opt)
        tensors = {**module_tensors("vae", vae), **ot, "rng": gen.get_state()}
        save_checkpoint(ck, tensors, {"step": step, "elapsed": elapsed, "param_groups": groups})

    bar = tqdm(total=vc.steps, initial=step, desc="vae", disable=not progress, mininterval=10)
    vae.train()
    last_ck, t0, run = time.time(), time.time() - elapsed, None
    while step < vc.steps:
        idx = torch.randint(0, images.shape[0], (vc.batch_size,), generator=gen)
        x = images[idx]  # (B, 3, S, S)
        flip = torch.rand(vc.batch_size, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        for g in opt.param_groups:
            g["lr"] = vc.lr * _lr_factor(step, vc.warmup, vc.steps)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)  # (B, C, 16, 16)
        rec = vae.decode(z).sample  # (B, 3, S, S)
        l1 = (rec - x).abs().mean()
        edge = (rec.diff(dim=-1) - x.diff(dim=-1)).abs().mean() + (rec.diff(dim=-2) - x.diff(dim=-2)).abs().mean()
        kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
        loss = l1 + vc.edge_weight * edge + vc.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        run = l1.item() if run is None else 0.98 * run + 0.02 * l1.item()
        bar.update(1)
        if step % 50 == 0 or step == vc.steps:
            elapsed = time.time() - t0
            _log(
                work,
                {
                    "stage": "vae",
                    "step": step,
                    "l1": round(run, 5),
                    "kl": round(kl.item(), 4),
                    "elapsed_s": round(elapsed, 1),
                    "steps_per_s": round(step / max(elapsed, 1e-6), 3),
                },
            )
            bar.set_postfix(l1=f"{run:.4f}", kl=f"{kl.item():.2f}")
        if time.time() - last_ck > cfg.checkpoint_every_s:
            elapsed = time.time() - t0
            save()
            last_ck = time.time()
    bar.close()
    elapsed = time.time() - t0
    save()
    vae.eval()
    stats = latent_stats(vae, images)
    fold_latent_normalisation(vae, stats["mean"], stats["std"])
    with torch.no_grad():
        v = val[:256]
        psnr = _psnr(vae.decode(vae.encode(v).latent_dist.mean).sample, v)
    info = {
        "stage": "vae_done",
        "step": step,
        "elapsed_s": round(elapsed, 1),
        "val_psnr_db": round(psnr, 2),
        "latent_mean_before": [round(x, 3) for x in stats["mean"].tolist()],
        "latent_std_before": [round(x, 3) for x in stats["std"].tolist()],
    }
    _log(work, info)
    tmp = work / "vae.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(str(tmp), safe_serialization=True)
    (tmp / "train_info.json").write_text(json.dumps(info, indent=2))
    os.replace(tmp, final)
    return vae


@torch.no_grad()
def latent_stats(vae, images: torch.Tensor, batch: int = 256) -> dict[str, torch.Tensor]:
    """Per-channel mean and std of posterior samples over all images."""
    zs = []
    g = torch.Generator().manual_seed(0)
    for i in range(0, images.shape[0], batch):
        post = vae.encode(images[i : i + batch]).latent_dist
        zs.append(post.mean + post.std * torch.randn(post.mean.shape, generator=g))
    z = torch.cat(zs)  # (N, C, h, w)
    return {"mean": z.mean(dim=(0, 2, 3)), "std": z.std(dim=(0, 2, 3))}


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, work: Path, batch: int = 256) -> torch.Tensor:
    """(2N, 2C, h, w): posterior mean and std of each image and its mirror (cached in work/latents.safetensors)."""
    from safetensors.torch import load_file, save_file

    path = work / "latents.safetensors"
    if path.is_file():
        return load_file(str(path))["latents"]
    out = []
    for x in (images, images.flip(-1)):
        for i in range(0, x.shape[0], batch):
            post = vae.encode(x[i : i + batch]).latent_dist
            out.append(torch.cat([post.mean, post.std], dim=1))
    lat = torch.cat(out).contiguous()
    tmp = path.with_name(path.name + ".tmp")
    save_file({"latents": lat}, str(tmp))
    os.replace(tmp, path)
    return lat


# ---------------------------------------------------------------------------------------------------- UNet


def _captions(tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids of all captions (index 0 is the empty caption) and the indices of the colour / grey ones."""
    caps = ["", *COLOUR_CAPTIONS, *GREY_CAPTIONS]
    ids = tokenizer(
        caps, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids  # (K, 77)
    colour = torch.arange(1, 1 + len(COLOUR_CAPTIONS))
    grey = torch.arange(1 + len(COLOUR_CAPTIONS), len(caps))
    return ids, colour, grey


def train_unet(
    cfg: TinyConfig,
    latents: torch.Tensor,
    grey: list[bool],
    tokenizer,
    work: Path,
    progress: bool = True,
    stop_at_step: int | None = None,
):
    """Train (or resume) UNet + text encoder; returns (ema_unet, ema_text), or None when stopped early."""
    from diffusers import DDPMScheduler

    uc = cfg.unet
    c = latents.shape[1] // 2
    torch.manual_seed(cfg.seed + 2)
    text = build_text_encoder(cfg.text, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    unet = build_unet(uc, c, cfg.text.hidden_size, latents.shape[-1])
    ema_text = build_text_encoder(cfg.text, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    ema_unet = build_unet(uc, c, cfg.text.hidden_size, latents.shape[-1])
    ema_text.load_state_dict(text.state_dict())
    ema_unet.load_state_dict(unet.state_dict())
    params = list(unet.parameters()) + list(text.parameters())
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    opt = torch.optim.AdamW(params, lr=uc.lr, weight_decay=uc.weight_decay)
    sched = DDPMScheduler(**SCHEDULER_KW)
    alphas = sched.alphas_cumprod  # (T,)
    snr = alphas / (1 - alphas)  # (T,)
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    step, elapsed = 0, 0.0
    ck = work / "unet_ckpt.safetensors"
    if ck.is_file():
        t, meta = load_checkpoint(ck)
        for name, mod in (("unet", unet), ("text", text), ("ema_unet", ema_unet), ("ema_text", ema_text)):
            load_module(name, mod, t)
        load_optimizer("opt", opt, t, meta["param_groups"])
        gen.set_state(t["rng"])
        step, elapsed = meta["step"], meta["elapsed"]

    def save() -> None:
        ot, groups = optimizer_tensors("opt", opt)
        tensors = {
            **module_tensors("unet", unet),
            **module_tensors("text", text),
            **module_tensors("ema_unet", ema_unet),
            **module_tensors("ema_text", ema_text),
            **ot,
            "rng": gen.get_state(),
        }
        save_checkpoint(ck, tensors, {"step": step, "elapsed": elapsed, "param_groups": groups})

    cap_ids, colour_idx, grey_idx = _captions(tokenizer)
    is_grey = torch.tensor(grey + grey)  # (2N,): latents hold the images, then their mirrors
    n = latents.shape[0]
    if step >= uc.steps:
        return ema_unet, ema_text
    bar = tqdm(total=uc.steps, initial=step, desc="unet", disable=not progress, mininterval=30)
    unet.train()
    text.train()
    last_ck, t0, run, t_start, s_start = time.time(), time.time() - elapsed, None, time.time(), step
    end = uc.steps if stop_at_step is None else min(uc.steps, stop_at_step)
    while step < end:
        b = uc.batch_size
        idx = torch.randint(0, n, (b,), generator=gen)
        mom = latents[idx]  # (B, 2C, h, w)
        z0 = mom[:, :c] + mom[:, c:] * torch.randn(mom[:, :c].shape, generator=gen)  # (B, C, h, w)
        noise = torch.randn(z0.shape, generator=gen)
        ts = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=gen)
        zt = sched.add_noise(z0, noise, ts)
        pick = torch.randint(0, 1 << 20, (b,), generator=gen)
        cap = torch.where(is_grey[idx], grey_idx[pick % len(grey_idx)], colour_idx[pick % len(colour_idx)])
        cap = torch.where(torch.rand(b, generator=gen) < uc.cond_dropout, torch.zeros_like(cap), cap)
        for g in opt.param_groups:
            g["lr"] = uc.lr * _lr_factor(step, uc.warmup, uc.steps)
        emb = text(cap_ids[cap])[0]  # (B, 77, D)
        pred = unet(zt, ts, emb).sample  # (B, C, h, w)
        per = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))  # (B,)
        if uc.min_snr_gamma > 0:
            s = snr[ts]
            per = per * torch.clamp(s, max=uc.min_snr_gamma) / s
        loss = per.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, uc.grad_clip)
        opt.step()
        step += 1
        decay = min(uc.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        raw = F.mse_loss(pred.detach(), noise).item()
        run = raw if run is None else 0.99 * run + 0.01 * raw
        bar.update(1)
        if step % 50 == 0 or step == uc.steps:
            elapsed = time.time() - t0
            sps = (step - s_start) / max(time.time() - t_start, 1e-6)
            _log(
                work,
                {
                    "stage": "unet",
                    "step": step,
                    "loss": round(run, 5),
                    "lr": round(opt.param_groups[0]["lr"], 7),
                    "elapsed_s": round(elapsed, 1),
                    "steps_per_s": round(sps, 3),
                },
            )
            bar.set_postfix(loss=f"{run:.4f}", sps=f"{sps:.2f}")
        if time.time() - last_ck > cfg.checkpoint_every_s:
            elapsed = time.time() - t0
            save()
            last_ck = time.time()
    bar.close()
    elapsed = time.time() - t0
    save()
    if step < uc.steps:
        _log(work, {"stage": "unet_stopped", "step": step, "elapsed_s": round(elapsed, 1)})
        return None
    _log(work, {"stage": "unet_done", "step": step, "loss": round(run or 0.0, 5), "elapsed_s": round(elapsed, 1)})
    return ema_unet, ema_text


def _check_config(cfg: TinyConfig, work: Path, resume: bool) -> None:
    path = work / "config.json"
    new = json.loads(json.dumps(asdict(cfg)))  # tuples as lists, as the file has them
    if resume and path.is_file():
        old = json.loads(path.read_text())
        default = json.loads(json.dumps(asdict(TinyConfig())))  # work folders older than these keys are v1
        for key in ("crop_size", "datasets"):
            if old.get(key, default[key]) != new[key]:
                raise ValueError(f"--resume with a different {key} than {path}: {old.get(key)} != {new[key]}")
        for part in ("vae", "text", "unet"):
            a = {k: v for k, v in old[part].items() if k != "steps"}
            b = {k: (list(v) if isinstance(v, tuple) else v) for k, v in new[part].items() if k != "steps"}
            if a != b:
                raise ValueError(f"--resume with a different {part} config than {path}: {a} != {b}")
    atomic_write_bytes(path, json.dumps(new, indent=2).encode())


def pretrain(
    faces: str | Path,
    out: str | Path,
    work: str | Path,
    cfg: TinyConfig | None = None,
    resume: bool = False,
    cache_dir: str | Path = "cache/tiny",
    progress: bool = True,
    stop_at_step: int | None = None,
) -> Path | None:
    """Run every stage (skipping the finished ones when resuming) and export to ``out``.

    ``stop_at_step`` ends the UNet stage early (checkpointed, not exported; returns None): a long run can be
    split into chunks and continued with ``resume=True``.
    """
    cfg = cfg or TinyConfig()
    check_out_dir(out)  # refuse a folder the export would replace before hours of training, not after
    work = prepare_work_dir(work, resume)  # clears only what an earlier pretrain wrote there
    torch.set_num_threads(cfg.threads)
    _check_config(cfg, work, resume)
    t0 = time.time()
    crops, records = build_crops(
        faces, cache_dir, max_photos=cfg.max_photos, progress=progress, size=cfg.crop_size, datasets=cfg.datasets
    )
    _log(
        work,
        {
            "stage": "crops",
            "n": len(records),
            "identities": len({(r.dataset, r.identity) for r in records}),
            "seconds": round(time.time() - t0, 1),
        },
    )
    images = _to_tensor(crops)
    is_train = torch.tensor([r.split == "train" for r in records])
    val = images[~is_train] if (~is_train).any() else images[:64]
    if not (work / "tokenizer" / "vocab.json").is_file():
        write_tokenizer(work / "tokenizer")
    tokenizer = load_tokenizer(work / "tokenizer")
    vae = train_vae(cfg, images, val, work, progress)
    vae.eval()
    latents = encode_latents(vae, images, work)
    if train_unet(cfg, latents, [r.grey for r in records], tokenizer, work, progress, stop_at_step) is None:
        return None
    return export_pipeline(cfg, work, Path(out))
