"""``difflora hypernet train|eval`` and ``difflora predict``.

``train --dataset DIR`` trains on a ``difflora data build`` output (``--synthetic-demo`` on the built-in synthetic
dataset, a demo); ``eval`` writes the evaluation table; ``predict`` turns photos into an adapter file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline_data.cliargs import (
    MAX_REFINE_STEPS,
    finite,
    positive,
    refine_steps,
    resolve_device,
    seed,
    writable_dir,
    writable_file,
)

from .config import PRESETS, get_preset
from .strict_json import dumps


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="difflora hypernet", description="Train and evaluate the hypernetwork.")
    sub = p.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_eval(sub)
    _add_finetune(sub)
    _add_tune(sub)
    return p


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="train the weight autoencoder, then the denoiser")
    src = t.add_mutually_exclusive_group()
    src.add_argument("--dataset", type=Path, help="a `difflora data build` output directory (the real adapters)")
    src.add_argument(
        "--synthetic-demo", action="store_true", help="a demo on the built-in synthetic LoRA dataset instead"
    )
    t.add_argument("--token-dim", type=int, default=64, help="values per adapter token (--dataset)")
    t.add_argument(
        "--canonicalize", action="store_true", help="SVD-canonicalise LoRA/DoRA factors (default: raw factors)"
    )
    t.add_argument("--min-gain", type=float, default=None, help="drop identities whose identity-check gain is lower")
    t.add_argument("--out", required=True, type=Path, help="run directory (checkpoints, metrics, exported model)")
    t.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model and training sizes")
    t.add_argument("--ae-steps", type=int, help="override the preset's autoencoder steps")
    t.add_argument("--dn-steps", type=int, help="override the preset's denoiser steps")
    t.add_argument("--batch-size", type=int, help="override the preset's batch size")
    t.add_argument("--seed", type=int, default=0, help="training seed (model init, batches, noise)")
    t.add_argument(
        "--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", dest="settings",
        help="override any preset field, e.g. --set autoencoder.latent_tokens=8 --set sampling.cfg_scale=2",
    )  # fmt: skip
    t.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    t.add_argument("--amp", choices=("auto", "bf16", "off"), help="bf16 autocast (default: the preset's, auto)")
    t.add_argument("--no-resume", action="store_true", help="start over (deletes earlier checkpoints in --out)")
    t.add_argument("--num-identities", type=int, default=400, help="synthetic identities (split by identity)")
    t.add_argument("--test-fraction", type=float, default=0.15, help="held-out test identities")
    t.add_argument("--val-fraction", type=float, default=0.1, help="validation identities (of the rest)")
    t.add_argument("--mlp-steps", type=int, default=1500, help="training steps of the regression-MLP baseline")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_eval(sub) -> None:
    e = sub.add_parser("eval", help="the evaluation table on the dataset's held-out (eval split) identities")
    e.add_argument("--dataset", required=True, type=Path, help="a `difflora data build` output directory")
    e.add_argument("--checkpoint", required=True, type=Path, help="a hypernet directory (from `hypernet train`)")
    e.add_argument("--out", required=True, type=Path, help="JSON result file (a PNG chart is written beside it)")
    e.add_argument("--seeds", type=int, default=8, help="generations per candidate and identity")
    e.add_argument("--limit", type=int, default=None, help="only the first N eval identities")
    e.add_argument("--sample-steps", type=int, default=None, help="hypernet DDIM steps (default: checkpoint's)")
    e.add_argument("--cfg-scale", type=float, default=None, help="hypernet CFG scale (default: checkpoint's)")
    e.add_argument("--mlp-epochs", type=int, default=300, help="training epochs of the regression-MLP baseline")
    e.add_argument(
        "--split", choices=("eval", "val", "all"), default="eval",
        help="eval: the table; val: tune sampling options on; all: every identity (a dataset of new people)",
    )  # fmt: skip
    e.add_argument(
        "--train-dataset", type=Path, help="with --split all: the dataset whose train identities the baselines use"
    )
    e.add_argument(
        "--refine-rows", default="5,20", help="basis checkpoints: rows of the code refined N steps ('' for none)"
    )
    e.add_argument("--no-refit", action="store_true", help="basis checkpoints: no oracle re-fit (refit_fidelity)")
    e.add_argument("--samples", type=int, default=None, help="hypernet samples averaged (default: checkpoint's)")
    e.add_argument(
        "--baselines", default="mean,nearest,mlp",
        help="comma-separated baselines to run ('' for none): mean, nearest, mlp, autoencoder (the oracle through "
        "the hypernet's autoencoder)",
    )  # fmt: skip
    e.add_argument(
        "--mlp-scales", default="", help="extra rows: the MLP's deviation from the mean amplified x s, e.g. 2,4,6"
    )


def _add_finetune(sub) -> None:
    f = sub.add_parser("finetune", help="fine-tune a basis hypernet end to end with the denoising loss on photos")
    f.add_argument("--checkpoint", required=True, type=Path, help="a hypernet over codes (`train` on a codes dataset)")
    f.add_argument("--faces", required=True, nargs="+", type=Path, help="identity-folder roots (eval split skipped)")
    f.add_argument("--out", required=True, type=Path, help="output predictor + run directory")
    f.add_argument("--dataset", type=Path, help="the codes dataset: its fitted codes anchor the small code loss")
    f.add_argument("--limit", type=int, help="only the first N identity folders")
    f.add_argument("--resume", action="store_true", help="continue the fine-tune state in --out")
    f.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    f.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", dest="settings",
        help="any FinetuneConfig field, e.g. --set steps=300 --set code_weight=0.01 --set splits=train,val",
    )  # fmt: skip


def _add_tune(sub) -> None:
    u = sub.add_parser("tune", help="choose CFG scale and samples averaged on the dataset's val identities")
    u.add_argument("--dataset", required=True, type=Path, help="a `difflora data build` output directory")
    u.add_argument("--checkpoint", required=True, type=Path, help="a hypernet directory (updated in place)")
    u.add_argument("--cfg-scales", default="1,2,4,8", help="comma-separated CFG scales to try")
    u.add_argument("--samples", default="1", help="comma-separated sample counts to try")
    u.add_argument("--steps", default="1,25", help="comma-separated DDIM step counts to try")
    u.add_argument(
        "--max-no-face-increase", type=float, default=0.02,
        help="options losing the face this much more often than the base model are not chosen",
    )  # fmt: skip
    u.add_argument("--limit", type=int, default=16, help="val identities used (0: all)")
    u.add_argument("--seeds", type=int, default=4, help="generations per option and identity")


def _numbers(text: str, flag: str, kind: type = float) -> tuple:
    """A comma-separated option value ("1,2,4") as a tuple of ``kind``; a clear error naming the flag."""
    try:
        values = tuple(kind(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    for v in values:
        if kind is float:
            finite(v, flag)
        else:
            positive(v, flag)
    return values


def _tune(args: argparse.Namespace) -> int:
    from .tune import tune_sampling

    scales = _numbers(args.cfg_scales, "--cfg-scales", float)
    samples = _numbers(args.samples, "--samples", int)
    steps = _numbers(args.steps, "--steps", int)
    if args.limit < 0:
        raise ValueError(f"--limit must be >= 0, got {args.limit}")
    positive(args.seeds, "--seeds")
    finite(args.max_no_face_increase, "--max-no-face-increase", lo=0.0)
    writable_dir(args.checkpoint, "--checkpoint (tune writes its choice into it)")
    res = tune_sampling(
        args.dataset, args.checkpoint, cfg_scales=scales, samples=samples, sample_steps=steps,
        limit=args.limit or None, seeds=args.seeds, max_no_face_increase=args.max_no_face_increase, progress=True,
    )  # fmt: skip
    for s in res["scores"]:
        print(
            f"cfg {s['cfg_scale']:<5} samples {s['samples']:<3} steps {s['sample_steps']:<3} "
            f"identity recovery {s['identity_recovery']:+.3f}"
            f"  function fidelity {s['function_fidelity']:+.3f}  no-face {s['no_face_rate']:.2f}"
        )
    c = res["chosen"]
    print(
        f"chosen: cfg {c['cfg_scale']}, samples {c['samples']}, steps {c['sample_steps']} "
        f"(written to {args.checkpoint}/config.json)"
    )
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from .config import _split_override
    from .finetune import FinetuneConfig, finetune

    positive(args.limit, "--limit")
    device = str(resolve_device(args.device))
    writable_dir(args.out, "--out")
    cfg = FinetuneConfig.from_dict(dict(_split_override(x) for x in args.settings), strict=True)
    res = finetune(
        args.checkpoint, args.faces, args.out, cfg, dataset=args.dataset, limit=args.limit, device=device,
        resume=args.resume, progress=not args.no_progress,
    )  # fmt: skip
    print(dumps(res, indent=2, sort_keys=True))
    return 0


def _train_overrides(args: argparse.Namespace, settings: list[str]) -> dict:
    """The train-section overrides of the options, after checking every option that a run would only use (and
    fail on) after minutes of work: seed, device, --out, --set values and the overridden fields."""
    from dataclasses import replace

    seed(args.seed)
    finite(args.min_gain, "--min-gain")
    positive(args.token_dim, "--token-dim")
    resolve_device(args.device)
    writable_dir(args.out, "--out")
    overrides = {"seed": args.seed}
    for key in ("ae_steps", "dn_steps", "batch_size", "amp"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    cfg = get_preset(args.preset).with_overrides(settings)  # type-checks the --set values
    if args.ae_steps is not None and cfg.autoencoder.kind == "linear":
        raise ValueError("--ae-steps has no effect with autoencoder.kind=linear (fitted in closed form, no steps)")
    replace(cfg.train, **overrides)  # checks the overridden fields
    return overrides


def _train_dataset(args: argparse.Namespace) -> int:
    from .fit import train_on_dataset

    overrides = _train_overrides(args, args.settings)
    res = train_on_dataset(
        args.dataset, args.out, preset=args.preset, token_dim=args.token_dim, overrides=overrides,
        min_gain=args.min_gain, canonicalize=args.canonicalize, settings=args.settings, device=args.device,
        resume=not args.no_resume, progress=not args.no_progress,
    )  # fmt: skip
    print(dumps(res, indent=2, sort_keys=True))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .evaluate import EvalConfig, evaluate
    from .table import write_results

    for flag in ("seeds", "limit", "sample_steps", "samples", "mlp_epochs"):
        positive(getattr(args, flag), f"--{flag.replace('_', '-')}")
    finite(args.cfg_scale, "--cfg-scale")
    writable_file(args.out, "--out")  # now, not after the evaluation
    cfg = EvalConfig(
        seeds=args.seeds, limit=args.limit, sample_steps=args.sample_steps, cfg_scale=args.cfg_scale,
        mlp_epochs=args.mlp_epochs, split=args.split, samples=args.samples,
        baselines=tuple(b for b in args.baselines.split(",") if b),
        mlp_scales=_numbers(args.mlp_scales, "--mlp-scales"), progress=True,
        refine_steps=_numbers(args.refine_rows, "--refine-rows", int), refit=not args.no_refit,
    )  # fmt: skip
    if args.train_dataset is not None and args.split != "all":
        raise ValueError("--train-dataset applies to --split all (otherwise the dataset's own train split is used)")
    res = evaluate(args.dataset, args.checkpoint, cfg, train_dataset=args.train_dataset)
    write_results(res, args.out)
    rows = {**res["baselines"], **res.get("variants", {}), "hypernet": res["hypernet"]}
    print(f"{res['n_identities']} held-out identities")
    print(
        f"{'candidate':<14} {'id. recovery':>13} {'fn fidelity':>12} {'(held-out)':>11} {'fn cosine':>10} "
        f"{'w. cosine':>10} {'loss gain':>10} {'no-face':>8} {'s/id':>8}"
    )
    for name, r in rows.items():
        print(
            f"{name:<14} {r['identity_recovery']:13.3f} {r['function_fidelity']:12.3f} "
            f"{r['function_fidelity_heldout']:11.3f} {r['function_cosine']:10.3f} {r['weight_cosine']:10.3f} "
            f"{r.get('heldout_loss_gain', float('nan')):10.3f} {r['no_face_rate']:8.2f} "
            f"{r['seconds_per_identity']:8.4f}"
        )
    return 0


# the synthetic demo (docs/hypernet.md) runs DiffLoRA's transformer LAE: its adapters are mostly face-predictable,
# unlike the tiny world's, for which the tiny preset uses the linear autoencoder; --set still overrides these
SYNTHETIC_DEMO_SETTINGS = [
    "autoencoder.kind=transformer",
    "autoencoder.latent_tokens=4",
    "autoencoder.latent_dim=8",
    "train.dn_steps=900",
]


def _train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from weights.atomic import atomic_write_text

    from .baselines import MeanAdapter, MLPConfig, NearestNeighbour, RegressionMLP
    from .metrics import summarize, weight_metrics
    from .sample import Hypernet
    from .synthetic import SyntheticConfig, make_synthetic
    from .train import train

    if args.num_identities < 3:
        raise ValueError(f"--num-identities must be >= 3 (train, val and test identities), got {args.num_identities}")
    positive(args.mlp_steps, "--mlp-steps")
    demo = SYNTHETIC_DEMO_SETTINGS if args.preset == "tiny" else []
    overrides = _train_overrides(args, [*demo, *args.settings])
    cfg = get_preset(args.preset).with_overrides([*demo, *args.settings])
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
    s = hn.config.sampling
    preds = {"hypernet": hn.predict_tokens(test.cond, steps=s.steps, cfg_scale=s.cfg_scale, samples=s.samples)}
    baselines = {
        "mean": MeanAdapter(),
        "nearest": NearestNeighbour(),
        "mlp": RegressionMLP(MLPConfig(steps=args.mlp_steps)),
    }
    preds |= {name: b.fit(train_set).predict(test.cond) for name, b in baselines.items()}
    table = {name: summarize(weight_metrics(p, test.tokens, test.mask, mean)) for name, p in preds.items()}
    atomic_write_text(args.out / "synthetic_eval.json", dumps(table, indent=2, sort_keys=True) + "\n")
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
            if args.dataset is None and not args.synthetic_demo:
                raise ValueError(
                    "--dataset DIR is required: a `difflora data build` output (`make tiny-assets` builds "
                    "data/tiny-lora); --synthetic-demo trains the demo on synthetic adapters instead"
                )
            return _train_dataset(args) if args.dataset else _train(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "tune":
            return _tune(args)
        if args.command == "finetune":
            return _finetune(args)
    except (ValueError, OSError) as e:  # OSError: a file or folder that cannot be read or written
        print(f"difflora hypernet {args.command}: {e}", file=sys.stderr)
        return 2
    return 2


def _check_export(spec, fmt: str, rank: int | None) -> None:
    """Refuse, before predicting, a format/rank whose conversion needs the base model's weights (predict loads
    none), saying which of predict's options work instead."""
    from weights.formats import DORA_FORMATS, export_needs_base

    if not export_needs_base(spec, fmt, rank):
        return
    what = f"{fmt} LoRA" + ("" if rank is None else f" of rank {rank}")
    works = "--format native"
    if spec.method == "dora":
        works = f"--format {' or '.join(DORA_FORMATS)} without --rank (written as DoRA, rank {spec.rank}), or {works}"
    raise ValueError(
        f"this checkpoint predicts {spec.method} adapters, whose conversion to {what} needs the base model's "
        f"weights, which predict does not load: use {works} (then `difflora adapter convert FILE OUT --to {fmt} "
        "--base MODEL_DIR` converts it)"
    )


def _photo_warnings(ident: dict) -> list[str]:
    """One line per photo that was skipped or left out, and one if the photos may show different people."""
    out = [
        f"skipped {f['error'] if f['name'] in f['error'] else f['name'] + ': ' + f['error']}" for f in ident["failed"]
    ]
    out += [f"left out {o['name']}: {o['reason']}" for o in ident["outliers"]]
    if not ident["consistent"] and not ident["outliers"] and len(ident["inliers"]) > 1:
        out.append(
            f"the photos may not show one person ({'; '.join(ident['warnings'])}): the adapter blends all "
            f"{len(ident['inliers'])} of them; pass photos of one person only"
        )
    return out


def predict_main(argv: list[str] | None = None) -> int:
    """``difflora predict PHOTO... --out FILE [--format diffusers|kohya|peft|native] [--seed S]``."""
    p = argparse.ArgumentParser(prog="difflora predict", description="Predict an identity's adapter from photos.")
    p.add_argument("photos", nargs="+", help="1..N photos of one person")
    p.add_argument("--out", required=True, type=Path, help="output file (a folder for --format peft)")
    p.add_argument("--format", default="diffusers", choices=("diffusers", "kohya", "peft", "native"))
    p.add_argument("--checkpoint", type=Path, default=Path(__file__).resolve().parents[1] / "assets/tiny/hypernet")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, 0 .. 2**63-1")
    p.add_argument("--steps", type=int, default=None, help="hypernet DDIM steps (default: the checkpoint's)")
    p.add_argument(
        "--rank", type=int, default=None, help="rank of the exported LoRA, >= 1 (default: the adapter's own)"
    )
    p.add_argument(
        "--refine-steps", type=int, default=0,
        help=f"refine the predicted code on the photos for N steps, 0 .. {MAX_REFINE_STEPS} (identity-basis "
        "checkpoints only; loads the base model)",
    )  # fmt: skip
    p.add_argument("--title", default="", help="title written into the file (e.g. the person's name)")
    p.add_argument(
        "--trigger", default=None, help="trigger phrase written into the file (default: the hypernet recipe's)"
    )
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    from weights.formats.metadata import check_text

    from .predict import Predictor, load_recipe

    try:
        seed(args.seed)
        positive(args.steps, "--steps")
        refine_steps(args.refine_steps)
        if args.rank is not None and args.rank < 1:
            raise ValueError(f"--rank must be >= 1, got {args.rank} (leave it out to keep the adapter's rank)")
        if args.rank is not None and args.format == "native":
            raise ValueError("--rank applies to the LoRA formats (diffusers, kohya, peft), not to --format native")
        check_text(args.title, "--title")
        check_text(args.trigger, "--trigger")
        (writable_dir if args.format == "peft" else writable_file)(args.out, "--out")
        predictor = Predictor.load(args.checkpoint)
        if args.refine_steps and not predictor.supports_refine:
            raise ValueError(
                f"--refine-steps needs a hypernet over identity-basis codes; {args.checkpoint} predicts "
                f"{predictor.spec.method} adapters through a token layout"
            )
        _check_export(predictor.spec, args.format, args.rank)
        adapter, ident = predictor.predict_photos(
            [str(x) for x in args.photos], seed=args.seed, steps=args.steps, refine_steps=args.refine_steps
        )
        for line in _photo_warnings(ident):
            print(f"difflora predict: warning: {line}", file=sys.stderr)
        from weights.formats.metadata import ExportInfo
        from weights.io import save_adapter

        recipe = load_recipe(args.checkpoint)
        info = ExportInfo(
            title=args.title, trigger=args.trigger or recipe.trigger, caption=recipe.caption,
            base_model=adapter.spec.base_model[:200], num_images=len(ident["inliers"]) or None, seed=args.seed,
            arch="sdxl" if "xl" in adapter.spec.base_model.lower() else "sd15",
            made_by=f"difflora hypernet prediction ({args.checkpoint.name})"[:200],
        )  # fmt: skip
        save_adapter(adapter, args.out, format=args.format, rank=args.rank, info=info)
    except (ValueError, OSError) as e:
        print(f"difflora predict: {e}", file=sys.stderr)
        return 2
    left = [o["name"] for o in ident["outliers"]] + [f["name"] for f in ident["failed"]]
    note = f" (left out: {', '.join(left)})" if left else ""
    n_used, n_layers = len(ident["inliers"]), len(adapter.spec.layers)
    refined = f", refined {args.refine_steps} steps in {ident['refine_seconds']:.2f} s" if args.refine_steps else ""
    print(f"adapter ({adapter.spec.method}, {n_layers} layers) from {n_used} photos{note}{refined} -> {args.out}")
    return 0
