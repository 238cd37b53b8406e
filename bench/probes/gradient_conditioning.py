"""Pilot: how much of the oracle adapter's effect does the recipe loss's gradient on the photos predict?

The fidelity ceiling (bench/probes/fidelity_ceiling.py) and the photo-conditioning probe
(bench/probes/photo_conditioning.py) say the oracle's effect on its training photos is photo-specific, and that
neither face embeddings nor linear photo statistics predict it (effect cosine < 0.1; fidelity 0.5 needs > 0.71).
The most informative feature of the photos *for this adapter* is the gradient of the recipe's loss at the base
model: forward and backward passes, no optimisation. This asks how far predictors built on it get, at what
cost, next to the recipe cut short.

For each identity, ``G`` = the mean over the first k of ``--batches`` batches (the recipe's batch size, photos
and mirror images, random noise and timesteps, a seed other than the recipe's) of dL/dW of every targeted layer W.
Candidates (ΔW per layer; r = the recipe's LoRA rank):

* ``mean``: the mean training-identity ΔW (the mean-adapter baseline, in function space);
* ``grad_proj_xk``: a_l · mean + b_l · (−G A0ᵀ A0), the gradient through the recipe's seeded LoRA init A0 (what a
  step on B can move);
* ``grad_svd_xk``: a_l · mean + b_l · the rank-r truncation of −G;
* ``grad_adam_xk``: a_l · mean + b_l · ΔW of the recipe's optimiser run on the linear surrogate <G, BA> from
  (B = 0, A0): the sign-like shape of Adam's updates;
* ``finetune_k``: the recipe cut to k steps (another seed than the oracle's; k = 50 is the full recipe re-run).

a_l, b_l are least squares per layer over the ``--train`` first training identities' ΔW (weight space). Scored on
the first ``--n`` val identities, never eval, like ``hypernet eval``'s function metrics: fidelity on the training
photos at fixed noise and timesteps, and effect cosine (its square is the fidelity at the best scale). Seconds
are per identity on this machine: the gradients' cumulative time, or the truncated fine-tune's whole call.

    .venv/bin/python -m bench.probes.gradient_conditioning [--dataset data/tiny-lora] [--train 200] [--n 16]
        [--batches 1 4 16] [--finetune-steps 5 10 25 50]

Also scores the shipped hypernet (``--checkpoint``: its default sampling options, and CFG 1) on the same identities,
from the photos' face embeddings. Writes bench/results/gradient_conditioning.json, a chart of fidelity against
seconds (gradient_conditioning.png) and prints a table.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hypernet.adapter_data import read_manifest
from hypernet.evaluate import EvalConfig, effect_fidelity, identity_crops, photo_inputs
from hypernet.predict import Predictor
from pipeline_data.adapter_train import encode_latents, train_identity, unet_conditioning
from pipeline_data.faces import get_encoder
from pipeline_data.models import load_pipeline
from pipeline_data.recipe import BuildConfig
from pipeline_data.stats import mean_ci
from weights.atomic import atomic_write_bytes, atomic_write_json
from weights.formats.native import load_native
from weights.inject import inject_adapter, remove_adapter
from weights.methods import method_config
from weights.methods.lora import lora_delta_matrix

REPO = Path(__file__).resolve().parents[2]

VARIANTS = ("grad_proj", "grad_svd", "grad_adam")


def crops_cached(rec: dict, encoder, size: int, pad: float, cache: Path) -> np.ndarray:
    """The identity's training crops, cached as .npy (detection and alignment are most of the time otherwise)."""
    path = cache / f"{rec['identity']}.npy"
    if path.is_file():
        return np.load(path)
    crops = identity_crops(rec, encoder, size, pad)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, crops)
    tmp.replace(path)
    return crops


def loss_gradients(pipe, sched, crops, recipe: BuildConfig, layers: list[str], counts: list[int], seed: int):
    """For each k in ``counts`` (ascending): (mean over the first k recipe batches of dL/dW per targeted layer,
    flattened to (m, n_flat); seconds spent so far). Batches are drawn like the recipe's: photos and mirror
    images, random noise and timesteps."""
    unet = pipe.unet
    t0 = time.perf_counter()
    size = crops.shape[1]
    g = torch.Generator().manual_seed(seed)
    lat = encode_latents(pipe, crops, g)
    cond = unet_conditioning(pipe, recipe.caption, recipe.batch_size, size, size)
    mods = {n: unet.get_submodule(n) for n in layers}
    for m in mods.values():
        m.weight.requires_grad_(True)
        m.weight.grad = None
    out = {}
    try:
        for b in range(1, max(counts) + 1):
            idx = torch.randint(len(lat), (recipe.batch_size,), generator=g)
            x0 = lat[idx]
            noise = torch.randn(x0.shape, generator=g)
            t = torch.randint(0, sched.config.num_train_timesteps, (recipe.batch_size,), generator=g)
            F.mse_loss(unet(sched.add_noise(x0, noise, t), t, **cond).sample, noise).backward()
            if b in counts:
                grads = {n: m.weight.grad.detach().flatten(1) / b for n, m in mods.items()}
                out[b] = (grads, time.perf_counter() - t0)
        return out
    finally:
        for m in mods.values():
            m.weight.requires_grad_(False)
            m.weight.grad = None


def adam_on_linear_loss(grad: dict, A0: dict, recipe: BuildConfig) -> dict[str, torch.Tensor]:
    """The recipe's optimiser (AdamW, warm-up, clipping, steps) run from (B = 0, A = A0) on the linear surrogate
    L = Σ_l <G_l, B_l A_l>: the update's shape (per element, sign-like) when the gradient stays fixed."""
    B = {n: torch.zeros(G.shape[0], A0[n].shape[0], requires_grad=True) for n, G in grad.items()}
    A = {n: A0[n].clone().requires_grad_(True) for n in grad}
    params = list(B.values()) + list(A.values())
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    warmup = max(1, recipe.steps // 20)
    for step in range(recipe.steps):
        for group in opt.param_groups:
            group["lr"] = recipe.lr * min(1.0, (step + 1) / warmup)
        loss = sum((G * (B[n] @ A[n])).sum() for n, G in grad.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    with torch.no_grad():
        return {n: B[n] @ A[n] for n in grad}


def directions(grad: dict, A0: dict, rank: int, recipe: BuildConfig) -> dict[str, dict[str, torch.Tensor]]:
    """variant -> layer -> ΔW direction (m, n_flat)."""
    out: dict[str, dict[str, torch.Tensor]] = {"grad_proj": {}, "grad_svd": {}}
    for n, G in grad.items():
        out["grad_proj"][n] = -(G @ A0[n].T) @ A0[n]  # what one step on B alone can move, from the seeded A0
        U, S, Vh = torch.linalg.svd(-G, full_matrices=False)
        out["grad_svd"][n] = (U[:, :rank] * S[:rank]) @ Vh[:rank]
    out["grad_adam"] = adam_on_linear_loss(grad, A0, recipe)
    return out


def lora_delta(adapter, layers: list[str]) -> dict[str, torch.Tensor]:
    """layer -> the LoRA adapter's float32 ΔW (m, n_flat)."""
    cfg = method_config(adapter.spec)
    return {n: lora_delta_matrix(adapter.layer_params(n), cfg) for n in layers}


@torch.no_grad()
def eps_with(pipe, sched, delta: dict | None, lat, noise, t, cond) -> torch.Tensor:
    unet = pipe.unet
    saved = {}
    try:
        for n, d in (delta or {}).items():
            W = unet.get_submodule(n).weight
            saved[n] = W.detach().clone()
            W.add_(d.view_as(W).to(W.dtype))
        return unet(sched.add_noise(lat, noise, t), t, **cond).sample.float()
    finally:
        for n, w in saved.items():
            unet.get_submodule(n).weight.copy_(w)


def delta_eps(pipe, sched, crops: np.ndarray, cands: dict, caption: str, timesteps) -> dict[str, torch.Tensor]:
    """Every candidate's (ΔW per layer, or None) noise prediction at ``hypernet eval``'s function-fidelity inputs."""
    lat, noise, ts, cond = photo_inputs(pipe, crops, timesteps, caption, 0)
    return {c: eps_with(pipe, sched, d, lat, noise, ts, cond) for c, d in cands.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, default=REPO / "data" / "tiny-lora")
    ap.add_argument("--train", type=int, default=200, help="training identities the per-layer fit uses")
    ap.add_argument("--n", type=int, default=16, help="val identities scored (the first N)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16], help="recipe batches per gradient")
    ap.add_argument("--seed", type=int, default=12345, help="noise/timestep seed of the gradient (not the recipe's)")
    ap.add_argument("--finetune-steps", type=int, nargs="*", default=[5, 10, 25, 50], help="truncated fine-tunes")
    ap.add_argument("--checkpoint", type=Path, default=REPO / "assets" / "tiny" / "hypernet", help="hypernet rows")
    ap.add_argument("--cache", type=Path, default=REPO / "runs" / "crops", help="crop cache folder")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gradient_conditioning.json")
    args = ap.parse_args(argv)
    if min(args.batches) < 1 or args.train < 2 or args.n < 1 or any(k < 1 for k in args.finetune_steps):
        ap.error("--batches and --finetune-steps must be >= 1, --train >= 2 and --n >= 1")
    from diffusers import DDPMScheduler

    counts = sorted(set(args.batches))
    predictor = Predictor.load(args.checkpoint)
    recs = [r for r in read_manifest(args.dataset) if r.get("status") == "ok"]
    train = [r for r in recs if r["split"] == "train"][: args.train]
    val = [r for r in recs if r["split"] == "val"][: args.n]
    recipe = BuildConfig.from_dict(json.loads((args.dataset / "config.json").read_text()))
    if recipe.method != "lora":
        ap.error(f"a LoRA dataset is needed, this one is {recipe.method}")
    pipe = load_pipeline(recipe.base)
    pipe.unet.requires_grad_(False)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    encoder = get_encoder(recipe.face_backend)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    args.cache.mkdir(parents=True, exist_ok=True)
    init = torch.Generator().manual_seed(recipe.seed)  # the recipe's LoRA init, shared by every identity
    spec = inject_adapter(pipe.unet, recipe.adapter_spec(recipe.base), generator=init)
    A0 = {
        k[: -len("::A")]: v.float().flatten(1)
        for k, v in remove_adapter(pipe.unet).tensors.items()
        if k.endswith("::A")
    }
    layers = [lay.name for lay in spec.layers]
    names = [f"{v}_x{k}" for k in counts for v in VARIANTS]

    t0 = time.perf_counter()
    deltas = [lora_delta(load_native(args.dataset / r["adapter"]), layers) for r in train]
    mean = {n: torch.stack([d[n] for d in deltas]).mean(0) for n in layers}
    # per candidate and layer: normal equations of min_(a, b) Σ_i ||ΔW_i - a·mean - b·D_i||² over training identities
    ata = {c: {n: torch.zeros(2, 2, dtype=torch.float64) for n in layers} for c in names}
    aty = {c: {n: torch.zeros(2, dtype=torch.float64) for n in layers} for c in names}
    for i, (rec, Y) in enumerate(zip(train, deltas)):
        crops = crops_cached(rec, encoder, size, recipe.crop_padding, args.cache)
        for k, (grad, _) in loss_gradients(pipe, sched, crops, recipe, layers, counts, args.seed).items():
            for v, D in directions(grad, A0, spec.rank, recipe).items():
                for n in layers:
                    M, d, y = mean[n].double(), D[n].double(), Y[n].double()
                    md = float((M * d).sum())
                    ata[f"{v}_x{k}"][n] += torch.tensor([[float((M * M).sum()), md], [md, float((d * d).sum())]])
                    aty[f"{v}_x{k}"][n] += torch.tensor([float((M * y).sum()), float((d * y).sum())])
        if (i + 1) % 20 == 0:
            print(f"train {i + 1}/{len(train)} {time.perf_counter() - t0:.0f}s", flush=True)
    coef = {c: {n: torch.linalg.lstsq(ata[c][n], aty[c][n]).solution for n in layers} for c in names}

    ecfg = EvalConfig()
    per: dict[str, list[dict]] = {}
    seconds: dict[str, list[float]] = {}
    for j, rec in enumerate(val):
        crops = crops_cached(rec, encoder, size, recipe.crop_padding, args.cache)
        cands = {"base": None, "oracle": lora_delta(load_native(args.dataset / rec["adapter"]), layers), "mean": mean}
        for k, (grad, sec) in loss_gradients(pipe, sched, crops, recipe, layers, counts, args.seed).items():
            for v, D in directions(grad, A0, spec.rank, recipe).items():
                a_b = {n: [float(x) for x in coef[f"{v}_x{k}"][n]] for n in layers}
                cands[f"{v}_x{k}"] = {n: a_b[n][0] * mean[n] + a_b[n][1] * D[n] for n in layers}
                seconds.setdefault(f"{v}_x{k}", []).append(sec)
        cond = torch.tensor(rec["embeddings"], dtype=torch.float32)  # (P, E) the photos' face embeddings
        for c, cfg_scale in (("hypernet", None), ("hypernet_cfg1", 1.0)):
            tp = time.perf_counter()
            cands[c] = lora_delta(predictor.predict(cond, cfg_scale=cfg_scale), layers)
            seconds.setdefault(c, []).append(time.perf_counter() - tp)
        for k in args.finetune_steps:  # the recipe cut to k steps, with another seed than the oracle's
            res = train_identity(pipe, crops, replace(recipe, steps=k, seed=recipe.seed + 1), base_model=recipe.base)
            cands[f"finetune_{k}"] = lora_delta(res.adapter, layers)
            seconds.setdefault(f"finetune_{k}", []).append(res.seconds)
        eps = delta_eps(pipe, sched, crops, cands, recipe.caption, ecfg.timesteps)
        for c in cands:
            if c not in ("base", "oracle"):
                fid, fcos = effect_fidelity(eps, c)
                per.setdefault(c, []).append({"identity": rec["identity"], "fidelity": fid, "cosine": fcos})
        print(f"val {j + 1}/{len(val)} {time.perf_counter() - t0:.0f}s", flush=True)
    rows = {
        c: {
            "function_fidelity": mean_ci([m["fidelity"] for m in ms]),
            "function_cosine": mean_ci([m["cosine"] for m in ms]),
            "seconds": float(np.median(seconds[c])) if c in seconds else 0.0,
        }
        for c, ms in per.items()
    }
    doc = {
        "what": "predictors from the recipe loss's gradient on the photos vs truncated fine-tunes, on val identities",
        "train_identities": len(train),
        "val_identities": [r["identity"] for r in val],
        "batch_size": recipe.batch_size,
        "recipe_steps": recipe.steps,
        "hypernet": {"checkpoint": str(args.checkpoint), "cfg_scale": predictor.cfg_scale, "steps": predictor.steps},
        "seconds": "median per identity: the gradients' cumulative time, or train_identity's whole call",
        "rows": rows,
        "coefficients": {c: {n: [float(x) for x in coef[c][n]] for n in layers} for c in names},
        "per_identity": per,
    }
    atomic_write_json(args.out, doc, indent=2)
    _chart(rows, args.out.with_suffix(".png"), recipe.steps)
    print(f"{'candidate':<16} {'fn fidelity (95% CI)':>28} {'fn cosine':>10} {'seconds':>8}")
    for c, r in rows.items():
        (lo, hi), f = r["function_fidelity"]["ci95"], r["function_fidelity"]["mean"]
        print(f"{c:<16} {f:+10.3f} [{lo:+.3f}, {hi:+.3f}] {r['function_cosine']['mean']:10.3f} {r['seconds']:8.2f}")
    return 0


def _chart(rows: dict, path: Path, steps: int) -> None:
    """Fidelity (95 % CI) against seconds per identity (log): one line per predictor family; points below the
    axis are drawn at its floor with their value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    floor = -1.5
    families = {
        "finetune_": ("recipe cut to k steps", "#36c"),
        "grad_proj_x": ("gradient through A0 (k batches)", "#c33"),
        "grad_svd_x": ("gradient, rank-r SVD", "#e9a"),
        "grad_adam_x": ("gradient, Adam-shaped", "#f80"),
        "hypernet": ("hypernet (shipped CFG, CFG 1)", "#393"),
    }
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for prefix, (label, color) in families.items():
        pts = sorted((max(r["seconds"], 1e-3), c, r) for c, r in rows.items() if c.startswith(prefix))
        if not pts:
            continue
        xs = [x for x, _, _ in pts]
        fs = [r["function_fidelity"]["mean"] for _, _, r in pts]
        style = "o" if prefix == "hypernet" else "-o"  # two sampling options, not a curve
        ax.plot(xs, [max(f, floor) for f in fs], style, color=color, label=label, ms=4)
        for x, c, r in pts:
            f, (lo, hi) = r["function_fidelity"]["mean"], r["function_fidelity"]["ci95"]
            if f >= floor:
                ax.errorbar([x], [f], yerr=[[f - max(lo, floor)], [hi - f]], color=color, capsize=2, lw=0.8)
            tag = {"hypernet": "shipped", "hypernet_cfg1": "CFG 1"}.get(c, c.removeprefix(prefix))
            tag = tag if f >= floor else f"{tag} ({f:+.1f})"
            ax.annotate(tag, (x, max(f, floor)), textcoords="offset points", xytext=(3, 3), fontsize=7, color=color)
    ax.axhline(0.5, color="k", ls="--", lw=0.8, label="target 0.5")
    ax.axhline(rows["mean"]["function_fidelity"]["mean"], color="#999", ls=":", lw=0.8, label="mean adapter")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(floor - 0.1, 1.0)
    ax.set_xlabel(f"seconds per identity, this CPU (model time; full recipe = finetune_{steps})")
    ax.set_ylabel("function fidelity, val identities")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


if __name__ == "__main__":
    raise SystemExit(main())
