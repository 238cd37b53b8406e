"""Export the tiny pretrain's checkpoints as an fp16 diffusers folder with a model card."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path

import torch

from pipeline_data.tiny.arch import SCHEDULER_KW, TinyConfig, build_text_encoder, build_unet
from pipeline_data.tiny.card import model_card
from pipeline_data.tiny.ckpt import load_checkpoint, load_module
from pipeline_data.tiny.folders import check_out_dir
from pipeline_data.tiny.tokenizer import load_tokenizer


def export_pipeline(cfg: TinyConfig, work: Path, out: Path) -> Path:
    """Write the fp16 diffusers folder (EMA UNet + text encoder, folded VAE, DDIM) to ``out`` atomically.

    ``out`` must be absent, empty or an earlier tiny export (FolderRefusedError otherwise): nothing else is replaced.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    out = check_out_dir(out)
    tokenizer = load_tokenizer(work / "tokenizer")
    vae = AutoencoderKL.from_pretrained(str(work / "vae"))
    t, meta = load_checkpoint(work / "unet_ckpt.safetensors")
    c = vae.config.latent_channels
    size = vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1)
    text = build_text_encoder(cfg.text, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    unet = build_unet(cfg.unet, c, cfg.text.hidden_size, size)
    load_module("ema_text", text, t)
    load_module("ema_unet", unet, t)
    sched = DDIMScheduler(**SCHEDULER_KW, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    # UNet and VAE in fp16 (diffusers upcasts to fp32 on load unless told otherwise); the small text encoder stays
    # fp32 because transformers loads a model in its stored dtype, and a plain from_pretrained must work on CPU.
    unet.to(torch.float16)
    vae.to(torch.float16)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_sibling(out, "tmp")
    try:
        _write(pipe, cfg, work, meta, tmp, {"vae": vae, "text_encoder": text, "unet": unet})
        check_out_dir(out)  # again: something may have appeared there while the checkpoint was converted
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = _fresh_sibling(out, "old")
    if out.exists() or out.is_symlink():
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def _fresh_sibling(out: Path, kind: str) -> Path:
    """A new hidden folder next to ``out`` (a unique name: an existing folder is never reused or removed)."""
    p = out.with_name(f".{out.name}.{uuid.uuid4().hex[:12]}.{kind}")
    p.mkdir()
    return p


def _write(pipe, cfg: TinyConfig, work: Path, meta: dict, tmp: Path, modules: dict) -> None:
    """Save the pipeline, our tokenizer files, training.json and the model card into ``tmp``."""
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        shutil.copy2(work / "tokenizer" / name, tmp / "tokenizer" / name)  # our files; model_max_length 77
    train = {"unet_steps": meta.get("step"), "unet_seconds": round(meta.get("elapsed", 0.0), 1), "config": asdict(cfg)}
    vinfo = work / "vae" / "train_info.json"
    if vinfo.is_file():
        train["vae"] = json.loads(vinfo.read_text())
    train.update(_run_summary(work))
    train["params"] = {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}
    (tmp / "training.json").write_text(json.dumps(train, indent=2))
    (tmp / "README.md").write_text(model_card(train))


def _run_summary(work: Path) -> dict:
    """Data size and final UNet loss from metrics.jsonl."""
    out: dict = {}
    path = work / "metrics.jsonl"
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("stage") == "crops":
            out["data"] = {"crops": rec["n"], "identities": rec["identities"]}
        elif rec.get("stage") == "unet" and "loss" in rec:
            out["unet_loss"] = rec["loss"]
    return out
