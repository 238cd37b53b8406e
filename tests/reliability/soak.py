"""The identity-switch soak, shared by ``tests/reliability/test_soak.py`` (short) and ``bench/reliability.py --soak``.

In-process on the real tiny pipeline, through the exact calls the service's model worker makes for a switch
(``weights.apply.apply_adapter`` / ``restore`` on the live UNet, adapters read back from native safetensors files as
the engine's adapter loader does) and for a generation (the diffusers pipeline with one CPU ``torch.Generator`` per
image). Switching over HTTP would measure the queue and the JSON encoder, not the switch.

The cycle of targets is adapter 0, 1, ..., K-1, then the base model (a restore); adapters are re-read from disk
at every cycle start (a cache miss, as when the LRU cache evicts an identity). Generations are spread evenly over
the switches, each with the weights of the moment. Checked at the end: the UNet's state dict equals the original
bit for bit after a restore, and fixed-seed images (base model and adapter 0) equal those made before the soak.
Resident memory (VmRSS) is read after a warm-up (the first ``warmup`` fraction of the switches) and at the end.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

PROMPT = "a photo of sks person"


def rss_mb() -> float:
    """Resident memory of this process in MiB (VmRSS from /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def write_adapters(unet: torch.nn.Module, folder: Path, k: int = 4, seed: int = 0) -> list[Path]:
    """``k`` random non-zero LoRA adapters for ``unet`` saved as native safetensors files."""
    from tests.utils.adapters import make_adapter
    from weights.formats.native import save_native

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(k):
        p = folder / f"adapter-{i}.safetensors"
        save_native(make_adapter(unet, "lora", rank=4, seed=seed + i, noise=3.0), p)
        paths.append(p)
    return paths


def _generate(pipe: Any, seed: int, steps: int, size: int) -> np.ndarray:
    gen = [torch.Generator("cpu").manual_seed(seed)]
    out = pipe(prompt=[PROMPT], num_inference_steps=steps, guidance_scale=5.0, width=size, height=size,
               generator=gen, output_type="np")  # fmt: skip
    return np.asarray(out.images[0])  # (H, W, 3) float32 in [0, 1]


@torch.inference_mode()
def run_soak(
    pipe: Any,
    adapter_files: list[Path],
    *,
    switches: int = 1000,
    generations: int = 500,
    steps: int = 2,
    size: int = 64,
    seed: int = 1234,
    warmup: float = 0.1,
    progress: Any = None,
) -> dict:
    """Run the soak (see the module docstring) and return its figures."""
    from weights.apply import apply_adapter, restore
    from weights.io import load_any

    if switches < 1 or not 0 <= generations <= switches:
        raise ValueError(f"need 1 <= switches and 0 <= generations <= switches, got {switches}, {generations}")
    unet = pipe.unet
    original = {k: v.clone() for k, v in unet.state_dict().items()}
    adapters = [load_any(p, unet) for p in adapter_files]
    ref_base = _generate(pipe, seed, steps, size)
    apply_adapter(unet, adapters[0])
    ref_id = _generate(pipe, seed, steps, size)
    restore(unet)
    cycle = len(adapters) + 1  # K adapters, then the base model
    gen_at = {int(round(j * switches / generations)) for j in range(generations)} if generations else set()
    warm_at = max(1, int(switches * warmup))
    rss_warm = None
    made = applies = restores = 0
    t0 = time.perf_counter()
    for i in range(switches):
        k = i % cycle
        if k == 0:
            adapters = [load_any(p, unet) for p in adapter_files]  # a cache miss: read from disk again
        if k < len(adapters):
            apply_adapter(unet, adapters[k])
            applies += 1
        else:
            restore(unet)
            restores += 1
        if i in gen_at:
            _generate(pipe, seed + i, steps, size)
            made += 1
        if i + 1 == warm_at:
            gc.collect()
            rss_warm = rss_mb()
        if progress is not None and (i + 1) % 100 == 0:
            progress(i + 1, made)
    soak_s = time.perf_counter() - t0
    restore(unet)
    exact_restore = all(torch.equal(v, original[k]) for k, v in unet.state_dict().items())
    end_base = _generate(pipe, seed, steps, size)
    apply_adapter(unet, adapters[0])
    end_id = _generate(pipe, seed, steps, size)
    restore(unet)
    del adapters
    gc.collect()
    rss_end = rss_mb()
    return {
        "switches": switches, "applies": applies, "restores": restores, "generations": made,
        "adapters": len(adapter_files), "steps": steps, "size": size, "seconds": round(soak_s, 1),
        "exact_restore": exact_restore,
        "fixed_seed_base_unchanged": bool(np.array_equal(ref_base, end_base)),
        "fixed_seed_identity_unchanged": bool(np.array_equal(ref_id, end_id)),
        "adapter_changes_image": float(np.abs(ref_id - ref_base).mean()),
        "rss_mb_after_warmup": round(rss_warm, 1), "rss_mb_end": round(rss_end, 1),
        "rss_growth_pct": round(100 * (rss_end / rss_warm - 1), 2), "warmup_switches": warm_at,
    }  # fmt: skip
