"""``difflora hypernet ...``: train (and, once the LoRA dataset exists, evaluate) the hypernetwork.

For now training runs on the synthetic dataset (``--synthetic``); the data-build directory loader and the
``eval`` / ``predict`` commands come with the real adapter dataset.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import PRESETS, get_preset


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="difflora hypernet", description="Train and evaluate the hypernetwork.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the weight autoencoder, then the denoiser")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--synthetic", action="store_true", help="train on the built-in synthetic LoRA dataset (demo)")
    t.add_argument("--out", required=True, type=Path, help="run directory (checkpoints, metrics, exported model)")
    t.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model and training sizes")
    t.add_argument("--ae-steps", type=int, help="override the preset's autoencoder steps")
    t.add_argument("--dn-steps", type=int, help="override the preset's denoiser steps")
    t.add_argument("--batch-size", type=int, help="override the preset's batch size")
    t.add_argument("--seed", type=int, default=0, help="training seed (model init, batches, noise)")
    t.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    t.add_argument("--amp", choices=("auto", "bf16", "off"), help="bf16 autocast (default: the preset's, auto)")
    t.add_argument("--no-resume", action="store_true", help="start over (deletes earlier checkpoints in --out)")
    t.add_argument("--num-identities", type=int, default=400, help="synthetic identities (split by identity)")
    t.add_argument("--test-fraction", type=float, default=0.15, help="held-out test identities")
    t.add_argument("--val-fraction", type=float, default=0.1, help="validation identities (of the rest)")
    t.add_argument("--mlp-steps", type=int, default=1500, help="training steps of the regression-MLP baseline")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .baselines import MeanAdapter, MLPConfig, NearestNeighbour, RegressionMLP
    from .metrics import summarize, weight_metrics
    from .sample import Hypernet
    from .synthetic import SyntheticConfig, make_synthetic
    from .train import train

    cfg = get_preset(args.preset)
    overrides = {"seed": args.seed}
    for key in ("ae_steps", "dn_steps", "batch_size", "amp"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    cfg = replace(cfg, train=replace(cfg.train, **overrides))
    data = make_synthetic(SyntheticConfig(num_identities=args.num_identities, seed=args.seed))
    rest, test = data.split(args.test_fraction, seed=args.seed)
    train_set, val_set = rest.split(args.val_fraction, seed=args.seed + 1)
    print(
        f"synthetic: {len(train_set)} train / {len(val_set)} val / {len(test)} test identities, "
        f"tokens {tuple(data.tokens.shape[1:])}",
        file=sys.stderr,
    )
    train(cfg, train_set, args.out, val_set=val_set, device=args.device, resume=not args.no_resume,
          progress=not args.no_progress)  # fmt: skip
    hn = Hypernet.load(args.out)
    mean = train_set.tokens.mean(0)  # (T, D)
    tc = hn.config.train
    preds = {"hypernet": hn.predict_tokens(test.cond, steps=tc.sample_steps, cfg_scale=tc.cfg_scale)}
    baselines = {
        "mean": MeanAdapter(),
        "nearest": NearestNeighbour(),
        "mlp": RegressionMLP(MLPConfig(steps=args.mlp_steps)),
    }
    preds |= {name: b.fit(train_set).predict(test.cond) for name, b in baselines.items()}
    table = {name: summarize(weight_metrics(p, test.tokens, test.mask, mean)) for name, p in preds.items()}
    (args.out / "synthetic_eval.json").write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    print(f"{'model':<10} {'cosine':>8} {'centered':>9} {'rel_mse':>8}")
    for name, s in table.items():
        print(f"{name:<10} {s['cosine']:8.4f} {s['centered_cosine']:9.4f} {s['rel_mse']:8.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse already printed the usage line
        return int(e.code or 0)
    try:
        if args.command == "train":
            return _train(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"difflora hypernet {args.command}: {e}", file=sys.stderr)
        return 2
    return 2
