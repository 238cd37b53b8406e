"""``difflora data build|check``: the identity-oriented adapter dataset."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .recipe import TARGET_PRESETS, BuildConfig


def _targets(s: str | list) -> list[str]:
    if isinstance(s, list):
        return [str(t) for t in s]
    return list(TARGET_PRESETS[s]) if s in TARGET_PRESETS else [t.strip() for t in s.split(",") if t.strip()]


BASIS_LR = 5e-2  # default --lr of --method basis (a code from zero; the probes' 0.05), unless the recipe names one
# data build options that are BuildConfig fields (flag --x-y is field x_y); the rest are inputs/outputs of the run
_RUN_OPTIONS = ("faces", "out", "limit", "ray_address", "summary", "recipe", "no_progress")  # not recipe fields


def _parser() -> argparse.ArgumentParser:
    from weights.methods import METHODS

    from .basis_train import BasisTrainConfig
    from .cliargs import OneLineParser, nonnegative_float, nonnegative_int, positive_float, positive_int
    from .recipe import BASIS_METHOD

    d = BuildConfig()
    p = OneLineParser(prog="difflora data", description="Build and check the per-identity adapter dataset.")
    sub = p.add_subparsers(dest="cmd", required=True)
    # build: recipe options default to SUPPRESS, so only the flags given are in the namespace (they override --recipe)
    b = sub.add_parser("build", help="train one adapter per identity folder", argument_default=argparse.SUPPRESS)
    b.add_argument("--faces", nargs="+", required=True, help="identity folders, or folders of them (dataset/identity)")
    b.add_argument("--out", required=True, help="output dataset directory (resumes if it exists)")
    b.add_argument("--recipe", help="a dataset_recipe.json (flag -> value) to replay; flags given here override it")
    b.add_argument("--base", help=f"base model preset (tiny|sd15|sdxl) or a diffusers folder (default {d.base})")
    b.add_argument("--method", choices=[*sorted(METHODS), BASIS_METHOD], help=f"adapter method (default {d.method})")
    b.add_argument("--basis", help="--method basis: the 'data basis' folder (or its basis.safetensors)")
    b.add_argument("--rank", type=positive_int, help=f"default {d.rank}")
    b.add_argument("--alpha", type=positive_float, help="adapter alpha (default: the rank)")
    b.add_argument("--method-params", help="JSON object of method hyper-parameters")
    b.add_argument("--targets", help="'full', 'attn' or comma-separated module patterns (default full)")
    b.add_argument("--steps", type=positive_int, help=f"default {d.steps}")
    b.add_argument("--lr", type=positive_float, help=f"default {d.lr} ({BASIS_LR} with --method basis)")
    b.add_argument("--batch-size", type=positive_int, help=f"default {d.batch_size}")
    b.add_argument("--seed", type=int, help=f"default {d.seed}")
    b.add_argument("--caption", help=f"default {d.caption!r}")
    b.add_argument("--class-prompt", help=f"prior-preservation prompt (default {d.class_prompt!r})")
    b.add_argument("--prior-weight", type=nonnegative_float, help=f"default {d.prior_weight}")
    b.add_argument("--prior-images", type=positive_int, help=f"default {d.prior_images}")
    b.add_argument("--min-photos", type=positive_int, help=f"default {d.min_photos}")
    b.add_argument("--max-photos", type=positive_int, help=f"default {d.max_photos}")
    b.add_argument("--face-backend", choices=["dlib", "insightface"], help=f"default {d.face_backend}")
    b.add_argument("--crop-padding", type=nonnegative_float, help=f"aligned-crop padding (default {d.crop_padding})")
    b.add_argument("--device", help=f"default {d.device}")
    b.add_argument("--threads", type=nonnegative_int, help="torch threads (0: torch's default)")
    b.add_argument("--limit", type=positive_int, default=None, help="only the first N identity folders (sorted)")
    b.add_argument("--ray-address", default=None, help="fan out on Ray: local | auto | HOST:PORT")
    b.add_argument(
        "--check-identities",
        type=nonnegative_int,
        help=f"identity check sample (0: skip; default {d.check_identities})",
    )
    b.add_argument(
        "--summary", default=None, help="also write the summary JSON here (e.g. bench/results/dataset.json)"
    )
    t = BasisTrainConfig()
    a = sub.add_parser("basis", help="learn an identity basis and one code per train-split identity")
    a.add_argument("--faces", nargs="+", required=True, help="identity folders, or folders of them (dataset/identity)")
    a.add_argument("--out", required=True, help="output folder (basis, codes, checkpoint, metrics)")
    a.add_argument("--resume", action="store_true", help="continue the folder's checkpoint")
    a.add_argument("--base", default=t.base, help="base model preset (tiny|sd15|sdxl) or a diffusers folder")
    a.add_argument("--directions", type=positive_int, default=t.num_directions, help="K, the identity space's dim")
    a.add_argument("--rank", type=positive_int, default=t.rank)
    a.add_argument("--alpha", type=positive_float, default=None, help="LoRA alpha (default: the rank)")
    a.add_argument("--targets", default="full", help="'full', 'attn' or comma-separated module patterns")
    a.add_argument("--steps", type=positive_int, default=t.steps)
    a.add_argument("--batch-size", type=positive_int, default=t.batch_size)
    a.add_argument("--lr-basis", type=positive_float, default=t.lr_basis)
    a.add_argument("--lr-codes", type=positive_float, default=t.lr_codes)
    a.add_argument("--code-init-std", type=nonnegative_float, default=t.code_init_std)
    a.add_argument("--code-reg", type=nonnegative_float, default=t.code_reg, help="weight of the codes' mean ‖c‖²")
    a.add_argument("--freeze-down", action="store_true", help="keep the shared down-projection at its random init")
    a.add_argument("--grad-clip", type=nonnegative_float, default=t.grad_clip, help="gradient norm clip (0: off)")
    a.add_argument("--seed", type=int, default=t.seed)
    a.add_argument("--caption", default=t.caption)
    a.add_argument("--min-photos", type=positive_int, default=t.min_photos)
    a.add_argument("--max-photos", type=positive_int, default=t.max_photos)
    a.add_argument("--face-backend", default=t.face_backend, choices=["dlib", "insightface"])
    a.add_argument("--crop-padding", type=nonnegative_float, default=t.crop_padding)
    a.add_argument("--device", default=t.device)
    a.add_argument("--threads", type=nonnegative_int, default=t.threads, help="torch threads (0: torch's default)")
    a.add_argument("--checkpoint-every", type=positive_int, default=t.checkpoint_every)
    a.add_argument("--limit", type=positive_int, default=None, help="only the first N train-split identity folders")
    c = sub.add_parser("check", help="identity check: do adapters' generations resemble their held-out photos?")
    c.add_argument("dir", help="dataset directory")
    c.add_argument(
        "--limit", type=positive_int, default=None, help="identities sampled (default: the build's setting)"
    )
    c.add_argument("--seeds", type=positive_int, default=None, help="generations per adapter")
    c.add_argument("--summary", default=None, help="also write the summary JSON here")
    for sp in (b, c):
        sp.add_argument("--no-progress", action="store_true", default=False, help="no progress bars")
    return p


def _fail(msg: str, cmd: str = "") -> int:
    print(f"difflora data{' ' + cmd if cmd else ''}: {msg}", file=sys.stderr)
    return 2


def _print_check(res: dict) -> None:
    g, m = res["identity_gain"], res["identity_margin"]
    print(f"identity check on {res['n_identities']} identities × {len(res['seeds'])} seeds:")
    print(f"  identity_gain   {g['mean']:+.4f}  95% CI [{g['ci95'][0]:+.4f}, {g['ci95'][1]:+.4f}]")
    print(f"  identity_margin {m['mean']:+.4f}  95% CI [{m['ci95'][0]:+.4f}, {m['ci95'][1]:+.4f}]")
    print(f"  top-1 {res['top1']:.3f} (chance {res['top1_chance']:.3f})")


def _summary(out: Path, build_summary: dict | None, check: dict | None) -> dict:
    from .build import read_records

    recs = read_records(out)
    ok = [r for r in recs.values() if r["status"] == "ok"]
    secs = [r.get("seconds_prepare", 0) + r.get("seconds_train", 0) for r in ok]
    return {
        "dataset": str(out),
        "config": json.loads((out / "config.json").read_text()),
        "identities_kept": len(ok),
        "identities_skipped": {k: r["reason"] for k, r in sorted(recs.items()) if r["status"] != "ok"},
        "splits": {s: sum(r.get("split") == s for r in ok) for s in ("train", "val", "eval")},
        "seconds_per_identity": round(sum(secs) / len(secs), 2) if secs else None,
        "build": build_summary,
        "identity_check": None if check is None else {k: v for k, v in check.items() if k != "per_identity"},
    }


def _json_option(name: str, value) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"--{name} is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"--{name} must be a JSON object, got {json.dumps(value)}")
    return value


def read_recipe(path: str | Path) -> dict:
    """BuildConfig fields of a ``dataset_recipe.json`` (``{"--flag": value}``, as ``BuildConfig.recipe_flags``
    writes it). A relative ``--basis`` is taken relative to the recipe's folder when it exists there."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except OSError as e:
        raise ValueError(f"--recipe {p}: cannot read it ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--recipe {p}: not JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"--recipe {p}: expected a JSON object of flag -> value")
    known = {f.name for f in dataclasses.fields(BuildConfig)}
    fields_: dict = {}
    for flag, value in raw.items():
        name = str(flag).removeprefix("--").replace("-", "_")
        if name not in known:
            raise ValueError(f"--recipe {p}: unknown option {flag!r}")
        fields_[name] = value
    basis = fields_.get("basis")
    if isinstance(basis, str) and basis and not Path(basis).expanduser().is_absolute():
        if (p.parent / basis).exists():
            fields_["basis"] = str(p.parent / basis)
    return fields_


def build_config_from_args(args: argparse.Namespace) -> BuildConfig:
    """The BuildConfig of ``data build``: defaults, then ``--recipe``'s values, then the flags given."""
    from .recipe import BASIS_METHOD

    fields_ = read_recipe(args.recipe) if getattr(args, "recipe", None) else {}
    given = {k: v for k, v in vars(args).items() if k not in _RUN_OPTIONS and k != "cmd"}
    fields_.update(given)
    if "targets" in fields_:
        fields_["targets"] = _targets(fields_["targets"])
    if "method_params" in fields_:
        fields_["method_params"] = _json_option("method-params", fields_["method_params"])
    if fields_.get("method") == BASIS_METHOD and "lr" not in fields_:
        fields_["lr"] = BASIS_LR
    try:
        return BuildConfig(**fields_)
    except TypeError as e:  # a recipe value of the wrong type
        raise ValueError(f"--recipe {getattr(args, 'recipe', None)}: {e}") from None


def _basis_main(args: argparse.Namespace) -> int:
    from .basis_train import BasisTrainConfig, train_basis

    cfg = BasisTrainConfig(
        base=args.base, num_directions=args.directions, rank=args.rank, alpha=args.alpha,
        targets=_targets(args.targets), steps=args.steps, batch_size=args.batch_size, lr_basis=args.lr_basis,
        lr_codes=args.lr_codes,
        code_init_std=args.code_init_std, code_reg=args.code_reg, train_down=not args.freeze_down,
        grad_clip=args.grad_clip, seed=args.seed, caption=args.caption, min_photos=args.min_photos,
        max_photos=args.max_photos, face_backend=args.face_backend, crop_padding=args.crop_padding, device=args.device,
        threads=args.threads, checkpoint_every=args.checkpoint_every,
    )  # fmt: skip
    s = train_basis(args.faces, args.out, cfg, limit=args.limit, resume=args.resume)
    print(
        f"basis K={cfg.num_directions} rank {cfg.rank} on {s['identities']} identities ({s['photos']} photos), "
        f"{s['steps']} steps: loss {s['loss_first']:.4f} -> {s['loss_last']:.4f} -> {args.out}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``difflora data``; returns the exit status (2: bad arguments, 1: some identities failed)."""
    from .cliargs import parse_args

    args = parse_args(_parser(), argv)
    if isinstance(args, int):
        return args
    from weights.atomic import atomic_write_json

    from .build import build, run_check

    try:
        if args.cmd == "basis":
            return _basis_main(args)
        if args.cmd == "build":
            cfg = build_config_from_args(args)
            out = Path(args.out)
            bs = build(args.faces, out, cfg, limit=args.limit, ray_address=args.ray_address,
                       progress=not args.no_progress)  # fmt: skip
            print(f"{bs['ok']} adapters, {len(bs['skipped'])} skipped, {len(bs['failed'])} failed -> {out}")
            for k, why in bs["failed"].items():
                print(f"  failed {k}: {why}", file=sys.stderr)
            check = None
            if cfg.check_identities and bs["ok"] >= 2:
                check = run_check(out, cfg, progress=not args.no_progress)
                _print_check(check)
            summary = _summary(out, bs, check)
            rc = 1 if bs["failed"] else 0
        else:
            out = Path(args.dir)
            if not (out / "config.json").is_file():
                return _fail(f"{out} is not a dataset directory (no config.json)", args.cmd)
            from .recipe import BuildConfig as _BC

            cfg = _BC.from_dict(json.loads((out / "config.json").read_text()))
            if args.seeds is not None:
                cfg.check_seeds = args.seeds
            check = run_check(out, cfg, limit=args.limit, progress=not args.no_progress)
            _print_check(check)
            summary, rc = _summary(out, None, check), 0
    except (ValueError, FileNotFoundError, OSError) as e:
        return _fail(" ".join(str(e).split()), args.cmd)
    atomic_write_json(out / "summary.json", summary, indent=2, sort_keys=True)
    if args.summary:
        atomic_write_json(args.summary, summary, indent=2, sort_keys=True)
    return rc
