"""How much of a new identity's oracle adapter lies in the span of the training identities' adapters?

Every predictor fitted on the training identities whose output is a combination of their adapters — nearest
neighbours and their blends, kernel ridge, a linear head on learned features, the linear autoencoder's decoder —
can at best output the new identity's oracle projected onto that span. This measures the projection's function
fidelity and effect cosine (scored like ``hypernet eval``'s function metrics) on the first ``--n`` val identities,
for spans of the first n training identities' adapters (ΔW, least squares over all targeted layers), and so how
the ceiling grows with the number of training identities.

``--seed-ids N`` also asks whether re-training known identities with another seed widens the span as much as new
identities do: it trains (and caches) the recipe with seed + 1 on the first N training identities and reports the
weight cosine of the projections onto N identities × 1 seed, N identities × 2 seeds and 2N identities × 1 seed.

    .venv/bin/python -m bench.probes.span_ceiling [--dataset data/tiny-lora] [--n 16] [--sizes 50 100 200 400 622]
        [--seed-ids 150]

Writes bench/results/span_ceiling.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.probes.gradient_conditioning import crops_cached, delta_eps
from hypernet.adapter_data import read_manifest
from hypernet.evaluate import EvalConfig, effect_fidelity
from pipeline_data.adapter_train import train_identity
from pipeline_data.faces import get_encoder
from pipeline_data.models import load_pipeline
from pipeline_data.recipe import BuildConfig
from pipeline_data.stats import mean_ci
from weights.atomic import atomic_write_json
from weights.formats.native import load_native, save_native

REPO = Path(__file__).resolve().parents[2]


def layer_deltas(adapters: list, name: str) -> torch.Tensor:
    """(len(adapters), m * n_flat): every adapter's ΔW of one layer, in float64 (``lora_delta_matrix`` is float32;
    the Gram matrices of 622 adapters over 5.7 M values need the precision)."""
    return torch.stack(
        [
            (
                a.spec.scale
                * a.tensors[f"{name}::B"].double().flatten(1)
                @ a.tensors[f"{name}::A"].double().flatten(1)
            ).flatten()
            for a in adapters
        ]
    )


def inner_products(adapters: list, targets: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ΔW inner products over all targeted layers, one layer at a time: the Gram matrix of ``adapters`` (k, k),
    their products with ``targets`` (k, V) and the targets' squared norms (V,)."""
    gram = torch.zeros(len(adapters), len(adapters), dtype=torch.float64)
    cross = torch.zeros(len(adapters), len(targets), dtype=torch.float64)
    total = torch.zeros(len(targets), dtype=torch.float64)
    for lay in targets[0].spec.layers:
        Y, y = layer_deltas(adapters, lay.name), layer_deltas(targets, lay.name)
        gram, cross, total = gram + Y @ Y.T, cross + Y @ y.T, total + (y**2).sum(1)
    return gram, cross, total


def span_coefficients(gram: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
    """(k, V) least-squares coefficients of V adapters on the span of k adapters, from their Gram matrix ``gram``
    (k, k) and inner products ``cross`` (k, V); a 1e-10 relative jitter keeps near-dependent spans solvable."""
    jitter = 1e-10 * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    return torch.linalg.solve(gram + jitter, cross)


def projection_cosines(coef: torch.Tensor, cross: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """(V,) cosine between each adapter and its projection (``coef`` from :func:`span_coefficients`); ``total`` =
    the adapters' squared norms."""
    return ((coef * cross).sum(0).clamp_min(0) / total).sqrt()  # ||P y||² = <coef, cross> for a projection


def seed_rows(
    pipe, encoder, recipe: BuildConfig, dataset: Path, train: list, va: list, n: int, cache: Path, crops: Path
) -> dict:
    """Weight cosines of the val adapters' projections: n identities (seed 0), the same with a second seed, 2n
    identities (seed 0). The second seed's adapters are trained once and cached in ``cache``."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    cache.mkdir(parents=True, exist_ok=True)
    seed = recipe.seed + 1
    again = []
    for i, rec in enumerate(train[:n]):
        path = cache / f"{rec['identity']}__seed{seed}.safetensors"
        if not path.is_file():
            c = crops_cached(rec, encoder, size, recipe.crop_padding, crops)
            save_native(train_identity(pipe, c, replace(recipe, seed=seed), base_model=recipe.base).adapter, path)
            print(f"seed {seed}: {i + 1}/{n}", flush=True)
        again.append(load_native(path))
    first = [load_native(dataset / rec["adapter"]) for rec in train[: 2 * n]]
    adapters = first + again  # 0..2n-1: seed 0; 2n..3n-1: the first n identities again with the other seed
    gram, cross, total = inner_products(adapters, va)
    spans = {
        f"{n} identities, seed {recipe.seed}": list(range(n)),
        f"{n} identities, seed {seed}": list(range(2 * n, 3 * n)),
        f"{n} identities x seeds {recipe.seed} and {seed}": list(range(n)) + list(range(2 * n, 3 * n)),
        f"{2 * n} identities, seed {recipe.seed}": list(range(2 * n)),
    }
    out = {}
    for name, idx in spans.items():
        ix = torch.tensor(idx)
        cos = projection_cosines(span_coefficients(gram[ix][:, ix], cross[ix]), cross[ix], total)
        out[name] = {"adapters": len(idx), "weight_cosine": mean_ci(cos.tolist())}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, default=REPO / "data" / "tiny-lora")
    ap.add_argument("--n", type=int, default=16, help="val identities scored (the first N)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200, 400, 622], help="training spans")
    ap.add_argument("--seed-ids", type=int, default=0, help="also compare a second seed on the first N identities")
    ap.add_argument("--seed-cache", type=Path, default=REPO / "runs" / "span_seeds", help="second-seed adapters")
    ap.add_argument("--cache", type=Path, default=REPO / "runs" / "crops", help="crop cache folder")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "span_ceiling.json")
    args = ap.parse_args(argv)
    from diffusers import DDPMScheduler

    recs = [r for r in read_manifest(args.dataset) if r.get("status") == "ok"]
    train = [r for r in recs if r["split"] == "train"]
    val = [r for r in recs if r["split"] == "val"][: args.n]
    sizes = sorted({min(s, len(train)) for s in args.sizes if s >= 1})
    if not sizes or not val:
        ap.error("need --sizes >= 1 and at least one val identity")
    if args.seed_ids < 0 or 2 * args.seed_ids > len(train):
        ap.error(f"--seed-ids must be between 0 and half the {len(train)} training identities")
    recipe = BuildConfig.from_dict(json.loads((args.dataset / "config.json").read_text()))
    if recipe.method != "lora":
        ap.error(f"a LoRA dataset is needed, this one is {recipe.method}")
    t0 = time.perf_counter()
    tr = [load_native(args.dataset / r["adapter"]) for r in train[: max(sizes)]]
    va = [load_native(args.dataset / r["adapter"]) for r in val]
    layers = [lay.name for lay in tr[0].spec.layers]
    gram, cross, total = inner_products(tr, va)
    # the val oracles' projections onto span(ΔW_1..ΔW_s): coefficients, weight cosines, then ΔW per layer (a second
    # pass: all training ΔW at once would not fit in memory)
    coefs = {s: span_coefficients(gram[:s, :s], cross[:s]) for s in sizes}
    wcos = {s: projection_cosines(coefs[s], cross[:s], total) for s in sizes}
    proj: dict[int, list[dict]] = {s: [{} for _ in va] for s in sizes}
    for name in layers:
        Y = layer_deltas(tr, name)
        for s in sizes:
            P = coefs[s].T @ Y[:s]  # (n_val, m * n_flat)
            for j in range(len(va)):
                proj[s][j][name] = P[j].float()
    print(f"spans built {time.perf_counter() - t0:.0f}s", flush=True)

    pipe = load_pipeline(recipe.base)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    encoder = get_encoder(recipe.face_backend)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    args.cache.mkdir(parents=True, exist_ok=True)
    ecfg = EvalConfig()
    per: dict[str, list[dict]] = {}
    for j, rec in enumerate(val):
        crops = crops_cached(rec, encoder, size, recipe.crop_padding, args.cache)
        oracle = {name: layer_deltas([va[j]], name)[0].float() for name in layers}
        cands = {"base": None, "oracle": oracle} | {f"span_{s}": proj[s][j] for s in sizes}
        eps = delta_eps(pipe, sched, crops, cands, recipe.caption, ecfg.timesteps)
        for s in sizes:
            fid, fcos = effect_fidelity(eps, f"span_{s}")
            per.setdefault(f"span_{s}", []).append(
                {"identity": rec["identity"], "fidelity": fid, "cosine": fcos, "weight_cosine": float(wcos[s][j])}
            )
        print(f"val {j + 1}/{len(val)} {time.perf_counter() - t0:.0f}s", flush=True)
    rows = {
        c: {
            "training_identities": int(c.split("_")[1]),
            "function_fidelity": mean_ci([m["fidelity"] for m in ms]),
            "function_cosine": mean_ci([m["cosine"] for m in ms]),
            "weight_cosine": mean_ci([m["weight_cosine"] for m in ms]),
        }
        for c, ms in per.items()
    }
    seeds = (
        seed_rows(pipe, encoder, recipe, args.dataset, train, va, args.seed_ids, args.seed_cache, args.cache)
        if args.seed_ids
        else None
    )
    doc = {
        "what": "val oracles projected onto the span of the first n training adapters (bench/probes/span_ceiling.py)",
        "val_identities": [r["identity"] for r in val],
        "rows": rows,
        **({"seeds": seeds} if seeds else {}),
        "per_identity": per,
    }
    atomic_write_json(args.out, doc, indent=2)
    print(f"{'span of':>8} {'fn fidelity (95% CI)':>28} {'fn cosine':>10} {'w. cosine':>10}")
    for r in rows.values():
        (lo, hi), f = r["function_fidelity"]["ci95"], r["function_fidelity"]["mean"]
        print(
            f"{r['training_identities']:8d} {f:+10.3f} [{lo:+.3f}, {hi:+.3f}] {r['function_cosine']['mean']:10.3f}"
            f" {r['weight_cosine']['mean']:10.3f}"
        )
    for name, r in (seeds or {}).items():
        print(f"{name:<40} ({r['adapters']} adapters): weight cosine {r['weight_cosine']['mean']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
