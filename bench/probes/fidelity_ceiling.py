"""How high can function fidelity go? Re-train eval identities' adapters and score them against the dataset's.

Function fidelity asks a candidate to reproduce the oracle adapter's effect on the denoiser at fixed noise on the
identity's training photos. Part of that effect is specific to the one training run (its seed: noise,
timesteps, batches) and to the exact photos, which no predictor from photos can know. This bench measures that
ceiling with adapters that know *more* than any zero-shot predictor: the same recipe on the same photos with
another seed (``reseeded``), and the same recipe on half of the photos (``half_photos``), next to the shipped
hypernet at its tuned sampling options (``hypernet``) and at CFG 1 (``hypernet_cfg1``: the plain posterior mean,
the prediction with the smallest expected error). All are scored exactly like the evaluation table's candidates
(same identities' held-out photos, generation seeds, noise, timesteps), including fidelity on the held-out photos
and the cosine of the effects (direction without magnitude).

``--average K`` (LoRA datasets) adds the row ``seed_average``: the average of K adapters trained with seeds
K..2K-1 (ΔW averaged exactly, as one rank-K·r LoRA), an estimate of the expected re-trained adapter, which is what
a perfect predictor of the training outcome (up to its seed) would give. It also adds a second table against a
less run-specific reference: the oracle becomes the average of seeds 0..K-1, scored for the average of seeds
K..2K-1 (``other_average``: that reference's own re-train ceiling), the dataset's single-seed adapter
(``single_seed``) and the hypernet. It answers whether oracles averaged over seeds would make the fidelity
target reachable for a predictor, or only for re-trained adapters. Images are generated once per adapter.

    .venv/bin/python -m bench.probes.fidelity_ceiling [--dataset data/tiny-lora] [--checkpoint assets/tiny/hypernet]
        [--n 16] [--seeds 8] [--average 3]

Writes bench/results/fidelity_ceiling.json and prints a table.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

from hypernet.adapter_data import load_adapter_dataset
from hypernet.evaluate import (
    EvalConfig,
    candidate_images,
    identity_crops,
    score_candidates,
)
from hypernet.predict import Predictor
from hypernet.table import summarize_candidates
from pipeline_data.adapter_train import train_identity
from pipeline_data.check import generate
from pipeline_data.faces import get_encoder
from pipeline_data.models import load_pipeline
from pipeline_data.recipe import BuildConfig
from weights.adapter import Adapter
from weights.atomic import atomic_write_json

REPO = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, default=REPO / "data" / "tiny-lora")
    ap.add_argument("--checkpoint", type=Path, default=REPO / "assets" / "tiny" / "hypernet")
    ap.add_argument("--n", type=int, default=16, help="eval identities (the first N)")
    ap.add_argument("--seeds", type=int, default=8, help="generations per candidate and identity")
    ap.add_argument("--average", type=int, default=0, help="also score against K-seed averaged oracles (LoRA)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "fidelity_ceiling.json")
    args = ap.parse_args(argv)
    from diffusers import DDPMScheduler

    predictor = Predictor.load(args.checkpoint)
    ds = load_adapter_dataset(
        args.dataset,
        token_dim=predictor.layout.token_dim,
        canonicalize=predictor.layout.canonicalize,
        splits=("eval",),
    )
    recipe = BuildConfig.from_dict(ds.recipe)
    pipe = load_pipeline(recipe.base)
    encoder = get_encoder(ds.face_backend)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    ecfg = EvalConfig(seeds=args.seeds)
    seeds = list(range(args.seeds))
    base_imgs = generate(pipe, recipe.caption, seeds, steps=ecfg.gen_steps, guidance=ecfg.guidance, size=size)
    if args.average and ds.spec.method != "lora":
        ap.error(f"--average needs a LoRA dataset, this one is {ds.spec.method}")
    per: dict[str, dict[str, dict]] = {}  # candidate -> identity -> metrics
    per_avg: dict[str, dict[str, dict]] = {}  # the same against the K-seed averaged oracle
    t0 = time.perf_counter()
    for row, rec in enumerate(ds.records[: args.n]):
        crops = identity_crops(rec, encoder, size, recipe.crop_padding)
        reseeded = train_identity(pipe, crops, replace(recipe, seed=recipe.seed + 1), base_model=recipe.base).adapter
        half = train_identity(pipe, crops[::2], recipe, base_model=recipe.base).adapter
        cond = ds.data.cond[row]  # (P, E) the identity's photos' face embeddings
        cands = {
            "base": None, "oracle": ds.adapter(row), "reseeded": reseeded, "half_photos": half,
            "hypernet": predictor.predict(cond), "hypernet_cfg1": predictor.predict(cond, cfg_scale=1.0),
        }  # fmt: skip
        k = args.average
        if k:  # seeds 0..K-1 (the dataset's adapter is seed 0) make the reference, seeds K..2K-1 the candidate
            runs = [cands["oracle"], reseeded] + [
                train_identity(pipe, crops, replace(recipe, seed=recipe.seed + s), base_model=recipe.base).adapter
                for s in range(2, 2 * k)
            ]
            cands["seed_average"] = average_lora(runs[k:])  # the expected re-trained adapter, never seed 0
        imgs = candidate_images(pipe, cands, ecfg, base_imgs, ds.recipe)
        for c, m in score_candidates(pipe, sched, encoder, rec, cands, ecfg, base_imgs, ds.recipe, imgs).items():
            per.setdefault(c, {})[rec["identity"]] = m
        if k:
            avg = {
                "base": None, "oracle": average_lora(runs[:k]), "other_average": cands["seed_average"],
                "single_seed": cands["oracle"], "hypernet": cands["hypernet"], "hypernet_cfg1": cands["hypernet_cfg1"],
            }  # fmt: skip
            made = {"other_average": imgs["seed_average"], "single_seed": imgs["oracle"]}
            made |= {c: imgs[c] for c in ("base", "hypernet", "hypernet_cfg1")}  # only the new reference is generated
            for c, m in score_candidates(pipe, sched, encoder, rec, avg, ecfg, base_imgs, ds.recipe, made).items():
                per_avg.setdefault(c, {})[rec["identity"]] = m
        print(f"{row + 1}/{args.n} {rec['identity']} {time.perf_counter() - t0:.0f}s", flush=True)
    rows = summarize_candidates(per)
    rows_avg = summarize_candidates(per_avg) if per_avg else None
    doc = {
        "what": "re-trained adapters scored against the dataset's (bench/probes/fidelity_ceiling.py)",
        "n_identities": len(per["oracle"]),
        "seeds": args.seeds,
        "hypernet": {"checkpoint": str(args.checkpoint), "cfg_scale": predictor.cfg_scale, "steps": predictor.steps},
        "identities": [r["identity"] for r in ds.records[: args.n]],
        "rows": rows,
        **({"seed_average": {"k": args.average, "rows": rows_avg}} if rows_avg else {}),
    }
    atomic_write_json(args.out, doc, indent=2, sort_keys=True)
    _print(rows)
    if rows_avg:
        print(f"against the average of {args.average} seeds:")
        _print(rows_avg)
    return 0


def _print(rows: dict) -> None:
    print(
        f"{'candidate':<14} {'id. recovery':>13} {'fn fidelity (95% CI)':>28} {'held-out':>9} {'fn cosine':>10}"
        f" {'w. cosine':>10}"
    )
    for c, r in rows.items():
        lo, hi = r["function_fidelity_ci95"]
        print(
            f"{c:<14} {r['identity_recovery']:13.3f} {r['function_fidelity']:10.3f} [{lo:+.3f}, {hi:+.3f}]"
            f" {r['function_fidelity_heldout']:9.3f} {r['function_cosine']:10.3f} {r['weight_cosine']:10.3f}"
        )


def average_lora(adapters: list[Adapter]) -> Adapter:
    """One LoRA whose ΔW is the mean of the adapters' (same spec): A stacked, B stacked and divided by K, rank K·r.
    Exact because ΔW = (alpha / r) B A and the stacked adapter keeps alpha / rank."""
    k, spec = len(adapters), adapters[0].spec
    if spec.method != "lora" or any(a.spec.hash() != spec.hash() for a in adapters):
        raise ValueError("average_lora needs LoRA adapters of one spec")
    alpha = spec.rank if spec.alpha is None else spec.alpha
    tensors = {}
    for name in adapters[0].tensors:
        parts = [a.tensors[name] for a in adapters]
        if name.endswith("::A"):
            tensors[name] = torch.cat(parts, 0)  # (K r, in)
        elif name.endswith("::B"):
            tensors[name] = torch.cat(parts, 1) / k  # (out, K r)
        else:
            raise ValueError(f"unexpected LoRA tensor {name}")
    return Adapter(replace(spec, rank=k * spec.rank, alpha=k * alpha), tensors)


if __name__ == "__main__":
    raise SystemExit(main())
