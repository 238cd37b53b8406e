"""``difflora tiny``: build the bundled tiny base model.

difflora tiny pretrain --faces DIR --out DIR [--work DIR] [--vae-steps N] [--unet-steps N] [--resume]
difflora tiny export   --work DIR --out DIR
difflora tiny sample   --model DIR --out PNG [--prompt TEXT] [--steps N] [--guidance G] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _config(args: argparse.Namespace):
    from pipeline_data.tiny.arch import tiny_preset

    cfg = tiny_preset(args.preset)
    if args.vae_steps is not None:
        cfg.vae.steps = args.vae_steps
    if args.unet_steps is not None:
        cfg.unet.steps = args.unet_steps
    if args.batch_size is not None:
        cfg.unet.batch_size = args.batch_size
        cfg.vae.batch_size = args.batch_size
    if args.max_photos is not None:
        cfg.max_photos = args.max_photos
    if args.threads is not None:
        cfg.threads = args.threads
    if args.checkpoint_every is not None:
        cfg.checkpoint_every_s = args.checkpoint_every
    return cfg


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``difflora tiny``; returns the exit status (2: bad arguments or a refused folder)."""
    from pipeline_data.cliargs import (
        OneLineParser,
        finite_float,
        nonnegative_float,
        parse_args,
        positive_int,
    )
    from pipeline_data.models import TINY_BASE
    from pipeline_data.tiny.arch import TINY_PRESETS, TinyConfig
    from pipeline_data.tiny.folders import FolderRefusedError

    d = TinyConfig()
    p = OneLineParser(prog="difflora tiny", description="build the bundled tiny base model")
    sub = p.add_subparsers(dest="cmd", required=True)
    pre = sub.add_parser("pretrain", help="train VAE, UNet and text encoder on aligned face crops; export")
    pre.add_argument("--faces", required=True, help="faces root with lfw/ celeba/ orl/ identity folders")
    pre.add_argument("--out", required=True, help="output diffusers folder: new, empty or an earlier export")
    pre.add_argument("--work", default="runs/tiny-pretrain", help="checkpoints and logs (default: %(default)s)")
    pre.add_argument("--cache", default="cache/tiny", help="face-crop cache directory (default: %(default)s)")
    pre.add_argument(
        "--preset",
        choices=sorted(TINY_PRESETS),
        default="v1",
        help="architecture: v1 = 64x64 through a 4x VAE; v2 = 128x128 through an 8x VAE on every photo "
        "(default %(default)s)",
    )
    pre.add_argument("--vae-steps", type=positive_int, help=f"VAE optimisation steps (default {d.vae.steps})")
    pre.add_argument("--unet-steps", type=positive_int, help=f"UNet optimisation steps (default {d.unet.steps})")
    pre.add_argument("--batch-size", type=positive_int, help="batch size for both VAE and UNet")
    pre.add_argument("--max-photos", type=positive_int, help="use an evenly spaced subset of photos (tests)")
    pre.add_argument("--threads", type=positive_int, help=f"torch threads (default {d.threads})")
    pre.add_argument(
        "--checkpoint-every",
        type=nonnegative_float,
        help=f"seconds between checkpoints (default {d.checkpoint_every_s:g})",
    )
    pre.add_argument("--resume", action="store_true", help="continue from the checkpoints in --work")
    pre.add_argument("--samples", help="also render a 4x4 sample grid PNG here")
    pre.add_argument("--no-progress", action="store_true", help="no progress bars")
    exp = sub.add_parser("export", help="export the latest checkpoint in --work as a diffusers folder")
    exp.add_argument("--work", default="runs/tiny-pretrain")
    exp.add_argument("--out", required=True, help="output diffusers folder: new, empty or an earlier export")
    smp = sub.add_parser("sample", help="render a 4x4 grid from a tiny diffusers folder")
    smp.add_argument("--model", default=str(TINY_BASE), help="diffusers folder (default: the bundled tiny base)")
    smp.add_argument("--out", required=True, help="PNG path")
    smp.add_argument("--prompt", default="a photo of a person")
    smp.add_argument("--steps", type=positive_int, default=25, help="denoising steps (default %(default)s)")
    smp.add_argument("--guidance", type=finite_float, default=3.0, help="CFG scale (default %(default)s)")
    smp.add_argument("--seed", type=int, default=0)
    args = parse_args(p, argv)
    if isinstance(args, int):
        return args
    try:
        if args.cmd == "pretrain":
            from pipeline_data.tiny.pretrain import pretrain
            from pipeline_data.tiny.sample import sample_grid

            if not Path(args.faces).is_dir():
                print(f"difflora tiny: faces directory not found: {args.faces}", file=sys.stderr)
                return 2
            out = pretrain(
                args.faces,
                args.out,
                args.work,
                _config(args),
                resume=args.resume,
                cache_dir=args.cache,
                progress=not args.no_progress,
            )
            if args.samples:
                sample_grid(out, args.samples)
            print(f"wrote {out}")
        elif args.cmd == "export":
            from pipeline_data.tiny.arch import TextConfig, TinyConfig, UNetConfig, VAEConfig
            from pipeline_data.tiny.export import export_pipeline

            raw = json.loads((Path(args.work) / "config.json").read_text())
            try:
                extra = {k: raw[k] for k in ("crop_size", "datasets") if k in raw}  # absent in v1 work folders
                cfg = TinyConfig(
                    vae=VAEConfig(**raw["vae"]),
                    text=TextConfig(**raw["text"]),
                    unet=UNetConfig(**raw["unet"]),
                    **extra,
                )
            except (KeyError, TypeError):
                raise ValueError(f"{args.work} is not a tiny pretrain work folder (unexpected config.json)") from None
            print(f"wrote {export_pipeline(cfg, Path(args.work), Path(args.out))}")
        elif args.cmd == "sample":
            from pipeline_data.tiny.sample import sample_grid

            if Path(args.out).is_dir():
                raise FolderRefusedError(f"--out {args.out} is a folder; give the PNG file to write")
            sample_grid(
                args.model, args.out, prompt=args.prompt, steps=args.steps, guidance=args.guidance, seed=args.seed
            )
            print(f"wrote {args.out}")
    except FolderRefusedError as e:  # a folder it would clear or replace holds something else: bad arguments
        print(f"difflora tiny {args.cmd}: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"difflora tiny {args.cmd}: {e}", file=sys.stderr)
        return 1
    return 0
