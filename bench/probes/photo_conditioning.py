"""Pilot: does photo content beyond the face embedding predict the oracle adapter's effect? (val identities only)

The fidelity ceiling (bench/probes/fidelity_ceiling.py) says the expected outcome of training on an identity's exact
photos reaches fidelity 0.62, while predictors from face embeddings reach effect cosine ~0.1. This asks whether the
photos' content, as the adapter sees it, closes part of that gap: kernel ridge regressions to the training
identities' adapter tokens from

* ``face``: the mean face embedding (what the hypernet is conditioned on);
* ``photo``: the mean and std over photos of the VAE latents of the identity's training crops (the very inputs of
  the adapter's training), standardised;
* ``both``: the two blocks, each scaled to unit total variance.

Each ridge penalty is chosen by exact leave-one-out error on the training identities. Candidates are scored on the
first ``--n`` val identities like ``hypernet eval``'s function metrics (training photos, fixed noise and
timesteps): function fidelity, and the effect cosine, whose square is the fidelity at the best scale.

    .venv/bin/python -m bench.probes.photo_conditioning [--dataset data/tiny-lora] [--n 16]

Writes bench/results/photo_conditioning.json (features are cached in --cache) and prints a table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from hypernet.adapter_data import load_adapter_dataset
from hypernet.data import mean_embedding
from hypernet.evaluate import EvalConfig, effect_fidelity, identity_crops, photo_eps
from pipeline_data.adapter_train import to_pixels
from pipeline_data.faces import get_encoder
from pipeline_data.models import load_pipeline
from pipeline_data.stats import mean_ci
from weights.atomic import atomic_write_json

REPO = Path(__file__).resolve().parents[2]

LAMBDAS = [10.0**e for e in range(-3, 5)]


def photo_features(ds, rows: list[int], pipe, encoder, cache: Path) -> np.ndarray:
    """(len(rows), 2·C·h·w): mean and std over the identity's training crops of their VAE latent means."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    pad = ds.recipe.get("crop_padding", 0.3)
    done = dict(np.load(cache)) if cache.is_file() else {}
    t0 = time.perf_counter()
    for i, row in enumerate(rows):
        name = ds.records[row]["identity"]
        if name in done:
            continue
        crops = identity_crops(ds.records[row], encoder, size, pad)
        with torch.no_grad():
            lat = pipe.vae.encode(to_pixels(crops, pipe.vae.device)).latent_dist.mean.flatten(1).numpy()  # (P, ·)
        done[name] = np.concatenate([lat.mean(0), lat.std(0)]).astype(np.float32)
        if (i + 1) % 25 == 0:
            _save(cache, done)
            print(f"photo features {i + 1}/{len(rows)} {time.perf_counter() - t0:.0f}s", flush=True)
    _save(cache, done)
    return np.stack([done[ds.records[r]["identity"]] for r in rows])


def _save(cache: Path, arrays: dict[str, np.ndarray]) -> None:
    """Atomic ``np.savez`` (the feature cache lets an interrupted run resume)."""
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(cache)


def kernel_ridge(F: torch.Tensor, Y: torch.Tensor) -> tuple[float, dict[float, float], torch.Tensor]:
    """Ridge F -> Y (both centred) in dual form: the penalty with the lowest exact leave-one-out MSE, every LOO MSE,
    and the dual coefficients (K + λI)⁻¹ Y (N, n) at that penalty."""
    K = F @ F.T  # (N, N)
    ev, U = torch.linalg.eigh(K)
    UtY = U.T @ Y  # (N, n)
    loo = {}
    for lam in LAMBDAS:
        h = ev / (ev + lam)  # eigenvalues of the hat matrix H = K (K + λI)⁻¹
        H_diag = (U**2) @ h  # (N,)
        resid = (Y - U @ (h[:, None] * UtY)) / (1 - H_diag)[:, None]  # LOO residuals
        loo[lam] = float((resid**2).mean())
    best = min(loo, key=loo.get)
    return best, loo, U @ (UtY / (ev + best)[:, None])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, default=REPO / "data" / "tiny-lora")
    ap.add_argument("--n", type=int, default=16, help="val identities scored (the first N)")
    ap.add_argument("--cache", type=Path, default=REPO / "runs" / "photo_features.npz")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "photo_conditioning.json")
    args = ap.parse_args(argv)
    from diffusers import DDPMScheduler

    torch.set_num_threads(2)
    ds = load_adapter_dataset(args.dataset, token_dim=512, splits=("train", "val"))
    train = [i for i, r in enumerate(ds.records) if r["split"] == "train"]
    val = [i for i, r in enumerate(ds.records) if r["split"] == "val"][: args.n]
    pipe = load_pipeline(ds.recipe.get("base", "tiny"))
    encoder = get_encoder(ds.face_backend)
    args.cache.parent.mkdir(parents=True, exist_ok=True)
    P = torch.from_numpy(photo_features(ds, train + val, pipe, encoder, args.cache)).double()
    E = mean_embedding([ds.data.cond[i] for i in train + val]).double()  # (N + V, 128)
    nt = len(train)
    mask = ds.layout.mask.flatten()
    Y = ds.data.tokens[train].flatten(1)[:, mask].double()  # (N, n) real entries
    y_mean = Y.mean(0)
    Yc = Y - y_mean

    def block(X: torch.Tensor) -> torch.Tensor:  # standardised on train, unit total variance per block
        mu, sd = X[:nt].mean(0), X[:nt].std(0).clamp_min(1e-8)
        Z = (X - mu) / sd
        return Z / Z[:nt].pow(2).sum(1).mean().sqrt()

    feats = {"face": block(E), "photo": block(P)}
    feats["both"] = torch.cat([feats["face"], feats["photo"]], 1)
    preds, chosen = {}, {}
    for name, F in feats.items():
        lam, loo, alpha = kernel_ridge(F[:nt], Yc)  # alpha (N, n)
        preds[name] = y_mean + F[nt:] @ F[:nt].T @ alpha  # (V, n)
        chosen[name] = {"lambda": lam, "loo_mse": loo[lam], "loo_mse_zero_model": float((Yc**2).mean())}
        print(f"{name}: lambda {lam:g}, LOO MSE {loo[lam]:.6g} (predicting the mean: {float((Yc**2).mean()):.6g})")

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    caption, pad = ds.recipe.get("caption", "a photo of sks person"), ds.recipe.get("crop_padding", 0.3)
    per: dict[str, dict[str, list[float]]] = {}
    for j, row in enumerate(val):
        cands = {"base": None, "oracle": ds.adapter(row), "mean": ds.adapter(row, _tokens(ds, y_mean))}
        cands |= {f"ridge_{k}": ds.adapter(row, _tokens(ds, preds[k][j])) for k in feats}
        crops = identity_crops(ds.records[row], encoder, size, pad)
        eps = photo_eps(pipe, sched, cands, crops, EvalConfig().timesteps, caption, 0)
        for c in cands:
            if c in ("base", "oracle"):
                continue
            fid, cos = effect_fidelity(eps, c)
            per.setdefault(c, {}).setdefault("function_fidelity", []).append(fid)
            per[c].setdefault("function_cosine", []).append(cos)
        print(f"{j + 1}/{len(val)} {ds.records[row]['identity']}", flush=True)
    rows = {c: {k: mean_ci(v) for k, v in m.items()} for c, m in per.items()}
    doc = {
        "what": "ridge from face embedding / photo latents to adapter tokens, scored on val (photo_conditioning.py)",
        "n_train": nt, "n_val": len(val), "identities": [ds.records[r]["identity"] for r in val],
        "ridge": chosen, "rows": rows,
    }  # fmt: skip
    atomic_write_json(args.out, doc, indent=2, sort_keys=True)
    print(f"{'candidate':<14} {'fn fidelity (95% CI)':>28} {'fn cosine (95% CI)':>28}")
    for c, r in rows.items():
        f, s = r["function_fidelity"], r["function_cosine"]
        print(
            f"{c:<14} {f['mean']:10.3f} [{f['ci95'][0]:+.3f}, {f['ci95'][1]:+.3f}]"
            f" {s['mean']:10.3f} [{s['ci95'][0]:+.3f}, {s['ci95'][1]:+.3f}]"
        )
    return 0


def _tokens(ds, flat_real: torch.Tensor) -> torch.Tensor:
    """Real entries (n,) -> raw tokens (T, D) with zeros in the padding."""
    t = torch.zeros(ds.layout.mask.numel(), dtype=torch.float32)
    t[ds.layout.mask.flatten()] = flat_real.float()
    return t.view(ds.layout.mask.shape)


if __name__ == "__main__":
    raise SystemExit(main())
