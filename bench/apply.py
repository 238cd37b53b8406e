"""Benchmark: adapter apply + restore on a real-size SD 1.5 UNet vs diffusers load + fuse + unfuse + unload.

Builds UNet2DConditionModel from SD 1.5's public config (random weights, no download), attaches a rank-4
attention LoRA (to_q, to_k, to_v, to_out.0 → 128 layers) and times, in one process (median of reps):
  ours:      weights.apply_adapter + weights.restore (exact restore from kept originals), in place (default)
             and in swap mode (inplace=False: merged weights in a buffer, restore swaps the original back)
  diffusers: unet.load_lora_adapter(state_dict, prefix="unet") + fuse_lora + unfuse_lora + unload_lora
plus our apply/restore for DoRA, SVFit and LoLDU of the same rank and layers. Writes bench/results/apply.json
(atomically) and prints a table. Run: ``.venv/bin/python bench/apply.py [--reps N]``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline_data.models import SD15_UNET_CONFIG  # noqa: E402
from weights import Adapter, AdapterSpec, apply_adapter, restore, to_diffusers  # noqa: E402
from weights.adapter import layer_key  # noqa: E402
from weights.atomic import atomic_write_json  # noqa: E402
from weights.spec import LayerInfo, match_targets  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TARGET_RATIO = 0.25  # ours / diffusers


def build_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**SD15_UNET_CONFIG).eval().requires_grad_(False)


def make(unet, method: str, rank: int, seed: int, params=None) -> Adapter:
    """A non-zero adapter from the method's own init (+ noise on the trainable tensors)."""
    from weights.methods import get_method, method_config

    layers = [
        LayerInfo(n, tuple(m.weight.shape))
        for n, m in unet.named_modules()
        if isinstance(m, torch.nn.Linear) and match_targets(n, TARGETS)
    ]
    spec = AdapterSpec(method=method, rank=rank, params=dict(params or {}), targets=TARGETS, layers=layers)
    m, cfg = get_method(method), method_config(spec)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    with torch.no_grad():
        for lay in layers:
            p = m.init_layer(unet.get_submodule(lay.name).weight, cfg, g)
            for k, v in p.items():
                if k in m.trainable:
                    v = v + 0.05 * torch.randn(v.shape, generator=g) * (float(v.abs().mean()) or 1.0)
                tensors[layer_key(lay.name, k)] = v.contiguous()
    return Adapter(spec, tensors)


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def bench_ours(unet, ad: Adapter, other: Adapter, reps: int, inplace: bool = True) -> dict:
    t = time.perf_counter()
    st = apply_adapter(unet, ad, inplace=inplace)
    first = time.perf_counter() - t  # includes taking the original copies (once per model)
    restore(unet, st)
    applies, restores, swaps = [], [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        st = apply_adapter(unet, ad, inplace=inplace)
        t1 = time.perf_counter()
        st = apply_adapter(unet, other, inplace=inplace)  # identity A -> B without going through the base weights
        t2 = time.perf_counter()
        restore(unet, st)
        t3 = time.perf_counter()
        applies.append(t1 - t0)
        swaps.append(t2 - t1)
        restores.append(t3 - t2)
    med = statistics.median
    return {
        "first_apply_s": first,
        "apply_s": med(applies),
        "swap_s": med(swaps),
        "restore_s": med(restores),
        "apply_restore_s": med([a + r for a, r in zip(applies, restores)]),
    }


def bench_diffusers(unet, sd: dict, reps: int) -> dict:
    rows = []
    for i in range(reps):
        name = f"bench_{i}"
        t0 = time.perf_counter()
        unet.load_lora_adapter(dict(sd), prefix="unet", adapter_name=name, low_cpu_mem_usage=True)
        t1 = time.perf_counter()
        unet.fuse_lora(lora_scale=1.0, adapter_names=[name])
        t2 = time.perf_counter()
        unet.unfuse_lora()
        t3 = time.perf_counter()
        unet.unload_lora()
        t4 = time.perf_counter()
        rows.append((t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0))
    med = [statistics.median(c) for c in zip(*rows)]
    return dict(zip(["load_s", "fuse_s", "unfuse_s", "unload_s", "total_s"], med))


def check_equal_to_diffusers(unet, ad: Adapter, sd: dict) -> float:
    """Max |W_ours − W_diffusers_fused| over the targeted layers (sanity check of the timed work)."""
    st = apply_adapter(unet, ad)
    ours = {lay.name: unet.get_submodule(lay.name).weight.detach().clone() for lay in ad.spec.layers}
    restore(unet, st)
    unet.load_lora_adapter(dict(sd), prefix="unet", adapter_name="check", low_cpu_mem_usage=True)
    unet.fuse_lora(adapter_names=["check"])
    diff = max(float((unet.get_submodule(n).base_layer.weight - w).abs().max()) for n, w in ours.items())
    unet.unfuse_lora()
    unet.unload_lora()
    return diff


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions (median reported)")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "apply.json"))
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: the shared 2-core host is oversubscribed)"
    )
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    import diffusers
    import peft

    t = time.perf_counter()
    unet = build_unet()
    build_s = time.perf_counter() - t
    n_params = sum(p.numel() for p in unet.parameters())
    lora = make(unet, "lora", a.rank, seed=1)
    lora_b = make(unet, "lora", a.rank, seed=2)
    sd, _, _ = to_diffusers(lora)
    ours = bench_ours(unet, lora, lora_b, a.reps)
    ours_swap = bench_ours(unet, lora, lora_b, a.reps, inplace=False)
    theirs = bench_diffusers(unet, sd, a.reps)
    max_diff = check_equal_to_diffusers(unet, lora, sd)
    methods = {}
    for method, params in (("dora", {}), ("svfit", {"svd": "lowrank"}), ("loldu", {})):
        t = time.perf_counter()
        ad = make(unet, method, a.rank, seed=3, params=params)
        ad_b = make(unet, method, a.rank, seed=4, params=params)
        init_s = time.perf_counter() - t
        methods[method] = {**bench_ours(unet, ad, ad_b, a.reps), "init_two_adapters_s": init_s}
    ratio = ours["apply_restore_s"] / theirs["total_s"]
    ratio_swap = ours_swap["apply_restore_s"] / theirs["total_s"]
    result = {
        "benchmark": "apply+restore vs diffusers load_lora_adapter+fuse_lora+unfuse_lora+unload_lora",
        "model": "SD 1.5 UNet from public config, random weights, fp32, CPU",
        "unet_params": n_params,
        "build_s": build_s,
        "layers": len(lora.spec.layers),
        "rank": a.rank,
        "lora_params": lora.num_params(),
        "reps": a.reps,
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__},
        "host": platform.processor() or platform.machine(),
        "ours_lora": ours,
        "ours_lora_swap_mode": ours_swap,
        "diffusers_lora": theirs,
        "ratio_vs_diffusers": ratio,
        "ratio_vs_diffusers_swap_mode": ratio_swap,
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio <= TARGET_RATIO,
        "max_abs_weight_diff_vs_diffusers_fuse": max_diff,
        "ours_other_methods": methods,
    }
    atomic_write_json(a.out, result, indent=2)
    print(
        f"SD 1.5 UNet ({n_params / 1e6:.0f} M params, built in {build_s:.1f} s), rank {a.rank}, "
        f"{len(lora.spec.layers)} attention layers, median of {a.reps}, {torch.get_num_threads()} threads"
    )
    print(f"{'what':44s}{'seconds':>10s}")
    rows = [
        ("ours LoRA apply", ours["apply_s"]),
        ("ours LoRA restore", ours["restore_s"]),
        ("ours LoRA apply + restore", ours["apply_restore_s"]),
        ("ours LoRA swap A->B (no restore)", ours["swap_s"]),
        ("ours LoRA first apply (copies originals)", ours["first_apply_s"]),
        ("ours LoRA swap-mode apply + restore", ours_swap["apply_restore_s"]),
        ("ours LoRA swap-mode first apply (buffers)", ours_swap["first_apply_s"]),
        ("diffusers load_lora_adapter", theirs["load_s"]),
        ("diffusers fuse_lora", theirs["fuse_s"]),
        ("diffusers unfuse_lora", theirs["unfuse_s"]),
        ("diffusers unload_lora", theirs["unload_s"]),
        ("diffusers total", theirs["total_s"]),
    ]
    rows += [(f"ours {m} apply + restore", r["apply_restore_s"]) for m, r in methods.items()]
    for name, s in rows:
        print(f"{name:44s}{s:10.4f}")
    print(
        f"ratio ours/diffusers = {ratio:.3f} in place, {ratio_swap:.3f} swap mode (target <= {TARGET_RATIO}); "
        f"max |W_ours - W_diffusers| = {max_diff:.2e}; wrote {a.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
