"""Tiny base v1 vs v2, side by side, in the identity check's own metric (issue: tiny base v2).

    .venv/bin/python -m bench.base_compare --model v1=assets/tiny/base --model v2=runs/tiny-v2-base

For each base model, at its own resolution:

* ``fd_dlib``: Fréchet distance between the dlib descriptors (whole image as a face, as the identity check embeds
  generations) of ``--samples`` generations and of as many real aligned crops of **eval** identities; plus the
  no-face rate (dlib's HOG detector on the image resized to 256 px) of the generations and, for reference, of the
  real crops.
* identity ceilings: the identity gain and margin (``pipeline_data.check``) of the eval identities' own aligned
  crops, and of the base's VAE reconstructions of those crops, against the identities' other (held-out) photos,
  with the base model's generations (seeds 0..7) as the reference — the most any adapter could carry.
* oracles: adapters trained with the shipped dataset recipe on ``--oracles`` val identities (the dataset build,
  resumable under ``--work``), scored by the build's own identity check.
* speed: seconds per generated image (20 DDIM steps, CFG 3, batches of 16) and per adapter-training step.

Writes ``bench/results/base_compare.json`` (the entries of the models measured are replaced, others kept, so v1
can be measured while v2 trains) and prints a table. ``--speed-only`` re-times every named model in one run, so
the speed ratio is measured under one machine load (``speed_same_run``; each model's own run keeps its timings).
The photos are read from ``DIFFLORA_FACES`` (default ``../shared/data/faces`` next to the repository); nothing of
them is written.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from pipeline_data.adapter_train import to_pixels
from pipeline_data.build import BuildConfig, build, discover, run_check
from pipeline_data.check import gain_and_margin, generate, similarity_matrix, summarize
from pipeline_data.models import load_pipeline
from pipeline_data.photos import faces_dir, list_photos
from pipeline_data.splits import split_of
from pipeline_data.tiny.crops import aligned_crop
from weights.safetensors_io import atomic_write_bytes

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "assets" / "tiny" / "hypernet" / "dataset_recipe.json"
CAPTION = "a photo of a person"
CHECK_SEEDS = list(range(8))


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to the rows of ``a`` (N, D) and ``b`` (M, D)."""
    mu = a.mean(0) - b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # s1^(1/2)
    m = r1 @ s2 @ r1  # symmetric PSD; Tr((s1 s2)^(1/2)) = sum sqrt(eig(m))
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(m), 0, None)).sum()
    return float(mu @ mu + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


class Photos:
    """Eval identities' photos, each decoded and detected once (shared by every base)."""

    def __init__(self, encoder, root: Path, n_ids: int, n_crops: int) -> None:
        self.encoder = encoder
        ids = discover([root / d for d in ("lfw", "celeba") if (root / d).is_dir()])
        self.eval_ids = [s for s in ids if split_of(s.dataset, s.name) == "eval"]
        self.faces: dict[str, list[tuple[np.ndarray, object]]] = {}
        per_id = [s for s in self.eval_ids if s.dataset == "lfw"]
        for src in per_id:
            if len(self.faces) >= n_ids:
                break
            got = self._load(src)
            if len(got) >= 4:
                self.faces[src.id] = got
        self.pool: list[tuple[np.ndarray, object]] = [x for v in self.faces.values() for x in v]
        for src in self.eval_ids:  # more eval photos (any dataset) for the real-crop distribution
            if len(self.pool) >= n_crops:
                break
            if src.id not in self.faces:
                self.pool.extend(self._load(src))
        self.pool = self.pool[:n_crops]

    def _load(self, src) -> list[tuple[np.ndarray, object]]:
        out = []
        for p in list_photos(src.path)[:12]:
            try:
                rgb = self.encoder.load_rgb(str(p))
                out.append((rgb, self.encoder.embed(rgb).face))
            except Exception:  # noqa: BLE001 - a photo without a usable face is skipped, as the build does
                continue
        return out

    def crops(self, items, size: int, padding: float) -> np.ndarray:
        return np.stack([aligned_crop(self.encoder, rgb, face, size, padding) for rgb, face in items])


@torch.no_grad()
def vae_reconstruct(pipe, crops: np.ndarray) -> np.ndarray:
    """(N, S, S, 3) uint8 decoded posterior means of the crops."""
    z = pipe.vae.encode(to_pixels(crops)).latent_dist.mean
    rec = pipe.vae.decode(z).sample.clamp(-1, 1)
    return ((rec + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def no_face_rate(encoder, images: np.ndarray) -> float:
    from PIL import Image

    miss = 0
    for im in images:
        big = np.asarray(Image.fromarray(im).resize((256, 256), Image.Resampling.BICUBIC))
        miss += not encoder.detect(big)
    return miss / len(images)


def ceiling(encoder, base_emb: np.ndarray, own: dict[str, np.ndarray], held: dict[str, np.ndarray]) -> dict:
    """Identity gain and margin of ``own[j]`` (generator embeddings) against ``held[j]``, base as reference."""
    ids = list(held)
    S = similarity_matrix(encoder, {"__base__": base_emb, **{i: own[i] for i in ids}}, held)
    gain, margin, _ = gain_and_margin(S)
    return {"identity_gain": summarize(gain), "identity_margin": summarize(margin)}


def oracle_faces(root: Path, n: int, work: Path) -> Path:
    """A folder of symlinks to the first ``n`` val-split LFW identities with >= 4 photos."""
    d = work / "val_faces" / "lfw"
    d.mkdir(parents=True, exist_ok=True)
    picked = 0
    for src in discover([root / "lfw"]):
        if picked >= n:
            break
        if split_of(src.dataset, src.name) != "val" or len(list_photos(src.path)) < 4:
            continue
        link = d / src.name
        if not link.exists():
            link.symlink_to(Path(src.path).resolve())
        picked += 1
    return d


def recipe_config(model: str, threads: int) -> BuildConfig:
    raw = json.loads(RECIPE.read_text())
    kw = {k.lstrip("-").replace("-", "_"): v for k, v in raw.items()}
    return BuildConfig(**kw, base=model, threads=threads)


def measure(name: str, model: str, photos: Photos, args, work: Path) -> dict:
    enc = photos.encoder
    pipe = load_pipeline(model, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    pad = json.loads(RECIPE.read_text())["--crop-padding"]
    out: dict = {
        "model": model,
        "resolution": size,
        "latent": [pipe.unet.config.in_channels, pipe.unet.config.sample_size],
    }
    # generations: fd_dlib, no-face rate, speed
    cache = work / name / f"generations-{args.samples}.npz"  # a rerun after a crash skips the long part
    if cache.is_file():
        with np.load(cache) as z:
            gen, out["seconds_per_image_20_steps"] = z["images"], float(z["seconds_per_image"])
    else:
        t0, imgs = time.perf_counter(), []
        for i in range(0, args.samples, 16):
            seeds = list(range(i, min(i + 16, args.samples)))
            imgs.append(generate(pipe, CAPTION, seeds, steps=20, guidance=3.0, size=size))
        gen = np.concatenate(imgs)
        out["seconds_per_image_20_steps"] = round((time.perf_counter() - t0) / len(gen), 4)
        cache.parent.mkdir(parents=True, exist_ok=True)
        with open(cache.with_suffix(".tmp"), "wb") as f:
            np.savez(f, images=gen, seconds_per_image=out["seconds_per_image_20_steps"])
        os.replace(cache.with_suffix(".tmp"), cache)
    real = photos.crops(photos.pool, size, pad)
    gen_emb, real_emb = enc.embed_images_as_faces(list(gen)), enc.embed_images_as_faces(list(real))
    out["fd_dlib"] = round(frechet(gen_emb, real_emb), 5)
    out["samples"], out["real_crops"] = len(gen), len(real)
    out["no_face_rate"] = round(no_face_rate(enc, gen), 4)
    out["no_face_rate_real_crops"] = round(no_face_rate(enc, real), 4)
    # ceilings: own crops and their VAE reconstructions vs held-out photos (the build's held-out rule: 1-2 photos)
    held, own, recon = {}, {}, {}
    for k, items in photos.faces.items():
        n_held = 2 if len(items) >= 8 else 1
        crops = photos.crops(items, size, pad)
        held[k] = enc.embed_images_as_faces(list(crops[:n_held]))
        own[k] = enc.embed_images_as_faces(list(crops[n_held:]))
        recon[k] = enc.embed_images_as_faces(list(vae_reconstruct(pipe, crops[n_held:])))
    base_emb = gen_emb[: len(CHECK_SEEDS)]  # seeds 0..7, as the identity check's base row
    out["ceiling_real_crops"] = ceiling(enc, base_emb, own, held)
    out["ceiling_vae_reconstruction"] = ceiling(enc, base_emb, recon, held)
    out["ceiling_identities"] = len(held)
    # oracles with the shipped recipe on val identities
    if args.oracles:
        cfg = recipe_config(model, args.threads)
        ds = work / name / "oracles"
        summary = build([oracle_faces(faces_dir(), args.oracles, work)], ds, cfg, progress=True)
        check = run_check(ds, cfg, limit=args.oracles)
        recs = [json.loads(p.read_text()) for p in sorted((ds / "records").glob("*.json"))]
        train_s = [r["seconds_train"] for r in recs if r.get("status") == "ok" and "seconds_train" in r]
        out["oracle"] = {
            "identities": summary["ok"],
            "identity_gain": check["identity_gain"],
            "identity_margin": check["identity_margin"],
            "top1": check["top1"],
            "seconds_per_training_step": round(float(np.mean(train_s)) / cfg.steps, 4) if train_s else None,
        }
    return out


def speed(model: str, photos: Photos, threads: int) -> dict:
    """Seconds per image (20 steps, CFG 3, a batch of 16) and per recipe training step (10 steps), one model."""
    from pipeline_data.adapter_train import train_identity

    pipe = load_pipeline(model, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    generate(pipe, CAPTION, [0, 1], steps=2, guidance=3.0, size=size)  # warm-up
    t0 = time.perf_counter()
    generate(pipe, CAPTION, list(range(16)), steps=20, guidance=3.0, size=size)
    per_image = (time.perf_counter() - t0) / 16
    cfg = recipe_config(model, threads)
    cfg.steps = 10
    crops = photos.crops(next(iter(photos.faces.values())), size, cfg.crop_padding)
    res = train_identity(pipe, crops, cfg, base_model=model)
    return {"seconds_per_image_20_steps": round(per_image, 4), "seconds_per_training_step": round(res.seconds / 10, 4)}


def _fmt(x: dict) -> str:
    return f"{x['mean']:+.3f} [{x['ci95'][0]:+.3f}, {x['ci95'][1]:+.3f}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, help="NAME=PATH of a base model (repeat)")
    ap.add_argument("--samples", type=int, default=512, help="generations (and real crops) for fd_dlib")
    ap.add_argument("--ceiling-ids", type=int, default=48, help="eval LFW identities for the ceilings")
    ap.add_argument("--oracles", type=int, default=16, help="val identities for the oracle check (0: skip)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "base_compare", help="oracle datasets (resumable)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "base_compare.json")
    ap.add_argument("--speed-only", action="store_true", help="only re-time the models, in this one run")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from pipeline_data.faces import get_encoder

    models = dict(m.split("=", 1) for m in args.model)
    res = json.loads(args.out.read_text()) if args.out.is_file() else {"samples": args.samples, "models": {}}
    if args.speed_only:
        photos = Photos(get_encoder("dlib"), faces_dir(), 1, 0)
        timed = {name: speed(path, photos, args.threads) for name, path in models.items()}
        res["speed_same_run"] = {"threads": args.threads, **timed}
        for name, t in timed.items():
            print(name, t, flush=True)
    else:
        photos = Photos(get_encoder("dlib"), faces_dir(), args.ceiling_ids, args.samples)
        for name, path in models.items():
            res["models"][name] = measure(name, path, photos, args, args.work)
            print(name, json.dumps(res["models"][name])[:300], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out, (json.dumps(res, indent=2) + "\n").encode())
    rows = [
        ("resolution", lambda m: f"{m['resolution']}"),
        ("fd_dlib (lower is better)", lambda m: f"{m['fd_dlib']:.4f}"),
        ("no-face rate (real crops)", lambda m: f"{m['no_face_rate']:.3f} ({m['no_face_rate_real_crops']:.3f})"),
        ("ceiling gain: real crops", lambda m: _fmt(m["ceiling_real_crops"]["identity_gain"])),
        ("ceiling gain: VAE reconstructions", lambda m: _fmt(m["ceiling_vae_reconstruction"]["identity_gain"])),
        ("ceiling margin: VAE reconstructions", lambda m: _fmt(m["ceiling_vae_reconstruction"]["identity_margin"])),
        ("oracle gain", lambda m: _fmt(m["oracle"]["identity_gain"]) if "oracle" in m else "-"),
        ("oracle margin", lambda m: _fmt(m["oracle"]["identity_margin"]) if "oracle" in m else "-"),
        ("s / image (20 steps), own run", lambda m: f"{m['seconds_per_image_20_steps']:.3f}"),
        ("s / training step, own run", lambda m: f"{(m.get('oracle') or {}).get('seconds_per_training_step')}"),
    ]
    same = res.get("speed_same_run", {})
    for key, label in (("seconds_per_image_20_steps", "image"), ("seconds_per_training_step", "training step")):
        rows.append((f"s / {label}, same run", lambda m, k=key: f"{same.get(m['name'], {}).get(k, '-')}"))
    for name, m in res["models"].items():
        m["name"] = name
    names = list(res["models"])
    print("| | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for label, f in rows:
        print(f"| {label} | " + " | ".join(f(res["models"][n]) for n in names) + " |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
