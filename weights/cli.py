"""``difflora adapter info FILE`` and ``difflora adapter convert IN OUT --to FORMAT [--rank R]``."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

FORMAT_CHOICES = ("diffusers", "kohya", "peft", "native")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="difflora adapter", description="Inspect and convert adapter files.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    info = sub.add_parser("info", help="method, rank, layers, parameters, base model, format, norms")
    info.add_argument("file", help="adapter file (.safetensors) or peft folder")
    info.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    conv = sub.add_parser("convert", help="convert between formats (non-LoRA methods: truncated SVD)")
    conv.add_argument("input", help="adapter file or peft folder")
    conv.add_argument("output", help="output file (peft: folder)")
    conv.add_argument("--to", required=True, choices=FORMAT_CHOICES, help="output format")
    conv.add_argument("--rank", type=int, default=None, help="LoRA rank of the output (default: the adapter's)")
    conv.add_argument("--arch", choices=("sd15", "sdxl"), default=None, help="kohya block naming (default from spec)")
    conv.add_argument("--title", default=None, help="title written into the output (default: the input's)")
    conv.add_argument("--trigger", default=None, help="trigger phrase written into the output (default: the input's)")
    conv.add_argument(
        "--base",
        default=None,
        help="the base model's UNet, needed to convert multiplicative methods and DoRA: a diffusers pipeline folder, "
        "its unet/ folder, or a model hub id",
    )
    return ap


def _layer_norms(adapter) -> list[float] | None:
    """‖ΔW‖_F per layer when it does not depend on the base weights."""
    import torch

    from .convert import layer_deltas, needs_base
    from .methods import get_method

    if needs_base(get_method(adapter.spec.method)):
        return None
    if adapter.spec.method == "lora":
        s = adapter.spec.scale
        out = []
        for lay in adapter.spec.layers:
            p = adapter.layer_params(lay.name)
            A, B = p["A"].double(), p["B"].double()  # (r, n), (m, r)
            out.append(s * float(torch.trace((B.T @ B) @ (A @ A.T)).clamp_min(0).sqrt()))  # ‖BA‖_F without BA
        return out
    return [float(dW.norm()) for _, dW, _ in layer_deltas(adapter)]


def _info(path: str, as_json: bool) -> int:
    from .io import detect_format, load_any
    from .methods import get_method, method_config

    fmt = detect_format(path)
    ad = load_any(path, format=fmt)
    spec = ad.spec
    method = get_method(spec.method)
    cfg = method_config(spec)
    n_train = sum(method.num_trainable(tuple(lay.shape), cfg) for lay in spec.layers)
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in ad.tensors.values()})
    norms = _layer_norms(ad)
    size = os.path.getsize(path) if os.path.isfile(path) else sum(e.stat().st_size for e in os.scandir(path))
    d = {
        "file": path,
        "format": fmt,
        "method": spec.method,
        "rank": spec.rank,
        "alpha": spec.alpha if spec.alpha is not None else spec.rank,
        "scale": spec.scale,
        "layers": len(spec.layers),
        "targets": spec.targets,
        "trainable_params": n_train,
        "stored_params": ad.num_params(),
        "dtypes": dtypes,
        "base_model": spec.base_model or "(unknown)",
        "bytes": size,
        "spec_hash": spec.hash(),
    }
    if norms:
        d["delta_norm"] = {"min": min(norms), "median": statistics.median(norms), "max": max(norms)}
    if as_json:
        print(json.dumps(d, sort_keys=True))
        return 0
    for k in (
        "file",
        "format",
        "method",
        "rank",
        "alpha",
        "layers",
        "trainable_params",
        "stored_params",
        "base_model",
    ):
        print(f"{k:17s}{d[k]}")
    print(f"{'dtypes':17s}{', '.join(dtypes)}")
    print(f"{'targets':17s}{', '.join(spec.targets)}")
    print(f"{'size':17s}{size / 1024:.1f} KiB")
    if norms:
        n = d["delta_norm"]
        print(f"{'|dW|_F':17s}min {n['min']:.4g}  median {n['median']:.4g}  max {n['max']:.4g}")
    else:
        print(f"{'|dW|_F':17s}(depends on the base weights for {spec.method})")
    return 0


def load_base_unet(base: str):
    """The UNet of ``base``: a diffusers pipeline folder (``unet/config.json``), a UNet folder (``config.json``), or
    a model hub id ("org/name", a pipeline). ValueError naming ``--base`` for a local path that is neither."""
    from pathlib import Path

    from diffusers import UNet2DConditionModel

    path = Path(base).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return UNet2DConditionModel.from_pretrained(str(path))
        if (path / "unet" / "config.json").is_file():
            return UNet2DConditionModel.from_pretrained(str(path), subfolder="unet")
        raise ValueError(
            f"--base {base}: neither a diffusers pipeline folder (unet/config.json) nor a UNet folder (config.json)"
        )
    hub_id = base.count("/") == 1 and not base.startswith((".", "/", "~")) and not path.exists()
    if not hub_id:
        raise ValueError(f"--base {base}: {'not a folder' if path.exists() else 'no such folder'}")
    return UNet2DConditionModel.from_pretrained(base, subfolder="unet")


def _convert(a: argparse.Namespace) -> int:
    from dataclasses import replace

    from .formats.metadata import check_text, for_adapter
    from .io import export_info, load_any, save_adapter

    check_text(a.title, "--title")
    check_text(a.trigger, "--trigger")
    ad = load_any(a.input)
    info = for_adapter(export_info(a.input), ad.spec.base_model)  # what the input says about itself carries over
    base = load_base_unet(a.base) if a.base else None
    arch = a.arch or ("sdxl" if "xl" in ad.spec.base_model.lower() else info.arch)
    kw = {"arch": arch} if a.to == "kohya" else {}
    info = replace(info, arch=arch)
    info = replace(info, **{k: v for k, v in (("title", a.title), ("trigger", a.trigger)) if v is not None})
    if a.to == "native" and a.rank is not None:
        from .convert import to_lora

        ad, report = to_lora(ad, a.rank, base)
        save_adapter(ad, a.output, "native", info=info)
    else:
        report = save_adapter(ad, a.output, a.to, rank=a.rank, base=base, info=info, **kw)
    print(f"wrote {a.output} ({a.to})")
    if report is not None:
        print(f"conversion: {report.summary()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = _parser()
    try:
        a = ap.parse_args(argv)
    except SystemExit as e:  # argparse already printed its message
        return int(e.code or 0)
    try:
        if a.cmd == "info":
            return _info(a.file, a.json)
        return _convert(a)
    except (ValueError, TypeError, OSError, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"difflora adapter {a.cmd}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
