"""``difflora data build|check``: the identity-oriented adapter dataset."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .recipe import TARGET_PRESETS, BuildConfig


def _targets(s: str) -> list[str]:
    return list(TARGET_PRESETS[s]) if s in TARGET_PRESETS else [t.strip() for t in s.split(",") if t.strip()]


def _parser() -> argparse.ArgumentParser:
    from weights.methods import METHODS

    from .cliargs import OneLineParser, nonnegative_float, nonnegative_int, positive_float, positive_int

    d = BuildConfig()
    p = OneLineParser(prog="difflora data", description="Build and check the per-identity adapter dataset.")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="train one adapter per identity folder")
    b.add_argument("--faces", nargs="+", required=True, help="identity folders, or folders of them (dataset/identity)")
    b.add_argument("--out", required=True, help="output dataset directory (resumes if it exists)")
    b.add_argument("--base", default=d.base, help="base model preset (tiny|sd15|sdxl) or a diffusers folder")
    b.add_argument("--method", default=d.method, choices=sorted(METHODS))
    b.add_argument("--rank", type=positive_int, default=d.rank)
    b.add_argument("--alpha", type=positive_float, default=None, help="adapter alpha (default: the rank)")
    b.add_argument("--method-params", default="{}", help="JSON object of method hyper-parameters")
    b.add_argument("--targets", default="full", help="'full', 'attn' or comma-separated module patterns")
    b.add_argument("--steps", type=positive_int, default=d.steps)
    b.add_argument("--lr", type=positive_float, default=d.lr)
    b.add_argument("--batch-size", type=positive_int, default=d.batch_size)
    b.add_argument("--seed", type=int, default=d.seed)
    b.add_argument("--caption", default=d.caption)
    b.add_argument("--prior-weight", type=nonnegative_float, default=d.prior_weight)
    b.add_argument("--min-photos", type=positive_int, default=d.min_photos)
    b.add_argument("--max-photos", type=positive_int, default=d.max_photos)
    b.add_argument("--face-backend", default=d.face_backend, choices=["dlib", "insightface"])
    b.add_argument("--device", default=d.device)
    b.add_argument("--threads", type=nonnegative_int, default=d.threads, help="torch threads (0: torch's default)")
    b.add_argument("--limit", type=positive_int, default=None, help="only the first N identity folders (sorted)")
    b.add_argument("--ray-address", default=None, help="fan out on Ray: local | auto | HOST:PORT")
    b.add_argument(
        "--check-identities", type=nonnegative_int, default=d.check_identities, help="identity check sample (0: skip)"
    )
    b.add_argument(
        "--summary", default=None, help="also write the summary JSON here (e.g. bench/results/dataset.json)"
    )
    c = sub.add_parser("check", help="identity check: do adapters' generations resemble their held-out photos?")
    c.add_argument("dir", help="dataset directory")
    c.add_argument(
        "--limit", type=positive_int, default=None, help="identities sampled (default: the build's setting)"
    )
    c.add_argument("--seeds", type=positive_int, default=None, help="generations per adapter")
    c.add_argument("--summary", default=None, help="also write the summary JSON here")
    for sp in (b, c):
        sp.add_argument("--no-progress", action="store_true", help="no progress bars")
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``difflora data``; returns the exit status (2: bad arguments, 1: some identities failed)."""
    from .cliargs import parse_args

    args = parse_args(_parser(), argv)
    if isinstance(args, int):
        return args
    from weights.safetensors_io import atomic_write_bytes

    from .build import build, run_check

    try:
        if args.cmd == "build":
            try:
                params = json.loads(args.method_params)
            except json.JSONDecodeError as e:
                return _fail(f"--method-params is not JSON: {e}", args.cmd)
            if not isinstance(params, dict):
                return _fail(f"--method-params must be a JSON object, got {args.method_params}", args.cmd)
            cfg = BuildConfig(
                base=args.base, method=args.method, rank=args.rank, alpha=args.alpha, method_params=params,
                targets=_targets(args.targets), steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                seed=args.seed, caption=args.caption, prior_weight=args.prior_weight, min_photos=args.min_photos,
                max_photos=args.max_photos, face_backend=args.face_backend, device=args.device, threads=args.threads,
                check_identities=args.check_identities,
            )  # fmt: skip
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
    atomic_write_bytes(out / "summary.json", (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
    if args.summary:
        atomic_write_bytes(args.summary, (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
    return rc
