"""Adapter-family comparison: which method does the hypernet predict best?

For each method, the same identities (a deterministic subset of the face folders: the first ``--eval`` eval,
``--val`` val and ``--train`` train identities in a hash order that mixes the datasets) get one adapter each
with the dataset recipe (only the method, and the learning rate for the one-vector methods, change), a
hypernet is trained on the train part, its sampling options (CFG scale, DDIM steps) are tuned on the val part,
and it is evaluated on the eval part with the same seeds. The LoRA arm
reuses the LoRA dataset's adapters (the build is deterministic per identity).

    .venv/bin/python bench/methods.py --lora-dataset data/tiny-lora [--methods lora,loldu,svfit,dora]

Writes bench/results/methods.json (+ methods.png; methods run separately are merged) and prints a table.
Resumable: builds and hypernet runs resume.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hypernet.evaluate import EvalConfig, evaluate  # noqa: E402
from hypernet.fit import train_on_dataset  # noqa: E402
from hypernet.tune import tune_sampling  # noqa: E402
from pipeline_data.build import IdentitySource, build, discover, write_manifest  # noqa: E402
from pipeline_data.photos import list_photos  # noqa: E402
from pipeline_data.recipe import BuildConfig  # noqa: E402
from pipeline_data.splits import split_of  # noqa: E402
from weights.atomic import atomic_write_json  # noqa: E402

# per-method data-build and hypernet choices; everything else is the LoRA dataset's recipe
METHODS = {
    "lora": {"lr": None, "token_dim": 512},
    "dora": {"lr": None, "token_dim": 512},
    "svfit": {"lr": 1e-2, "token_dim": 8},  # r values per layer: 10x the factor methods' lr, 1 token per layer
    "loldu": {"lr": 1e-2, "token_dim": 8},
}


def pick_identities(faces: list[Path], n_train: int, n_val: int, n_eval: int) -> list[IdentitySource]:
    """Identity folders with at least ``min_photos`` images, first of each split in sha256 order of the id."""
    srcs = [s for s in discover(faces) if len(list_photos(s.path)) >= BuildConfig().min_photos]
    srcs.sort(key=lambda s: hashlib.sha256(s.id.encode()).hexdigest())
    want = {"train": n_train, "val": n_val, "eval": n_eval}
    out = []
    for s in srcs:
        sp = split_of(s.dataset, s.name)
        if want[sp] > 0:
            out.append(s)
            want[sp] -= 1
    return sorted(out, key=lambda s: s.id)


def lora_subset(src: Path, dst: Path, ids: list[str]) -> None:
    """The LoRA arm: the chosen identities' records and adapters (hard links) of the full LoRA dataset."""
    (dst / "adapters").mkdir(parents=True, exist_ok=True)
    (dst / "records").mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    for k in ids:
        rec = src / "records" / f"{k}.json"
        if not rec.is_file():
            raise FileNotFoundError(f"{src} has no record for {k}: finish the LoRA build first")
        if json.loads(rec.read_text())["status"] == "ok":
            a = dst / "adapters" / f"{k}.safetensors"
            if not a.exists():
                os.link(src / "adapters" / f"{k}.safetensors", a)
        shutil.copy(rec, dst / "records" / f"{k}.json")
    write_manifest(dst)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lora-dataset", type=Path, default=REPO / "data" / "tiny-lora")
    ap.add_argument("--faces", type=Path, default=REPO.parent / "shared" / "data" / "faces")
    ap.add_argument("--methods", default="lora,loldu,svfit,dora")
    ap.add_argument("--train", type=int, default=80, help="train identities per method")
    ap.add_argument("--val", type=int, default=8, help="val identities per method")
    ap.add_argument("--eval", type=int, default=12, help="eval identities per method")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "methods")
    ap.add_argument("--ray-address", default="local")
    ap.add_argument("--hypernet-set", action="append", default=[], help="hypernet --set overrides (all methods)")
    ap.add_argument("--seeds", type=int, default=4, help="generations per candidate and identity")
    ap.add_argument("--cfg-scales", default="1,2,3,4,6", help="CFG scales tuned per method on its val identities")
    ap.add_argument("--steps", default="1", help="DDIM step counts tuned per method on its val identities")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "methods.json")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}; choose from {sorted(METHODS)}")

    lora_cfg = BuildConfig.from_dict(json.loads((args.lora_dataset / "config.json").read_text()))
    srcs = pick_identities([args.faces], args.train, args.val, args.eval)
    ids, folders = [s.id for s in srcs], [s.path for s in srcs]
    results: dict[str, dict] = {}
    if args.out.is_file():  # merge with methods run before on the same identities
        old = json.loads(args.out.read_text())
        if old.get("identity_ids") == ids:
            results = old["methods"]
    for m in methods:
        t0 = time.perf_counter()
        ds = args.work / m
        if m == "lora":
            lora_subset(args.lora_dataset, ds, ids)
            cfg = lora_cfg
        else:
            lr = METHODS[m]["lr"] or lora_cfg.lr
            cfg = replace(lora_cfg, method=m, lr=lr, check_identities=0, threads=0)
            build(folders, ds, cfg, ray_address=args.ray_address, progress=True)
        t_build = time.perf_counter() - t0
        extra = sorted({p.stem for p in (ds / "records").glob("*.json")} - set(ids))
        if extra:  # a work dir of a larger run: its hypernet would train on those identities too
            sys.exit(f"{ds} holds {len(extra)} identities this run did not pick (e.g. {extra[0]}); use a new --work")
        hn = ds / "hypernet"
        fit = train_on_dataset(
            ds, hn, token_dim=METHODS[m]["token_dim"], settings=args.hypernet_set, device="cpu", progress=False
        )
        tuned = tune_sampling(
            ds, hn, cfg_scales=tuple(float(x) for x in args.cfg_scales.split(",")), samples=(1,),
            sample_steps=tuple(int(x) for x in args.steps.split(",")), limit=None, seeds=args.seeds,
        )["chosen"]  # fmt: skip
        ecfg = EvalConfig(seeds=args.seeds, baselines=("mean", "nearest"))
        res = evaluate(ds, hn, ecfg)
        rows = {**res["baselines"], "hypernet": res["hypernet"]}
        results[m] = {
            "recipe": {"method": m, "lr": cfg.lr, "rank": cfg.rank, "steps": cfg.steps},
            "trainable_values": fit["tokens"][0] * fit["tokens"][1],
            "tokens": fit["tokens"],
            "train_identities": fit["train_identities"],
            "n_eval_identities": res["n_identities"],
            "oracle_identity_gain": rows["oracle"]["identity_gain"],
            "hypernet": {k: rows["hypernet"][k] for k in ("identity_recovery", "identity_recovery_ci95",
                                                          "function_fidelity", "weight_cosine")},
            "mean": {k: rows["mean"][k] for k in ("identity_recovery", "function_fidelity")},
            "nearest": {k: rows["nearest"][k] for k in ("identity_recovery", "function_fidelity")},
            "autoencoder_val": {k: v for k, v in fit.items() if k.startswith("val_")},
            "sampling": {k: tuned[k] for k in ("cfg_scale", "samples", "sample_steps", "identity_recovery")},
            "seconds_build": round(t_build, 1),
            "seconds_total": round(time.perf_counter() - t0, 1),
        }  # fmt: skip
        _write(args.out, ids, results, args)
    print(f"{'method':<7} {'values':>8} {'oracle gain':>12} {'hyp. recovery':>14} {'fn fidelity':>12} "
          f"{'mean rec.':>10} {'NN rec.':>8}")  # fmt: skip
    for m, r in results.items():
        print(
            f"{m:<7} {r['trainable_values']:8d} {r['oracle_identity_gain']['mean']:+12.4f} "
            f"{r['hypernet']['identity_recovery']:14.3f} {r['hypernet']['function_fidelity']:12.3f} "
            f"{r['mean']['identity_recovery']:10.3f} {r['nearest']['identity_recovery']:8.3f}"
        )
    return 0


def _write(out: Path, ids: list[str], results: dict, args: argparse.Namespace) -> None:
    doc = {
        "what": "hypernet per adapter family on the same identities (bench/methods.py)",
        "identities": {"n": len(ids), "train": args.train, "val": args.val, "eval": args.eval},
        "identity_ids": ids,
        "seeds": args.seeds,
        "hypernet_settings": args.hypernet_set,
        "methods": results,
    }
    atomic_write_json(out, doc, indent=2, sort_keys=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for j, (key, label) in enumerate((("hypernet", "hypernet"), ("mean", "mean"), ("nearest", "nearest"))):
        vals = [results[m][key]["identity_recovery"] for m in names]
        ax.bar([i + 0.27 * (j - 1) for i in range(len(names))], vals, width=0.27, label=label)
    ax.set_xticks(range(len(names)), names)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylabel("identity recovery")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
