"""A picture of what the evaluation table measures: generations of held-out identities with the base model, the
hypernet's predicted adapter and the identity's own trained adapter (oracle), same seeds.

    .venv/bin/python bench/samples.py [--dataset data/tiny-lora] [--checkpoint assets/tiny/hypernet] [--n 6]

Writes bench/results/hypernet_samples.png (generated images only: no photo of the shared datasets is copied).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hypernet.adapter_data import load_adapter_dataset  # noqa: E402
from hypernet.predict import Predictor  # noqa: E402
from pipeline_data.check import generate_with  # noqa: E402
from pipeline_data.models import load_pipeline  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, default=REPO / "data" / "tiny-lora")
    ap.add_argument("--checkpoint", type=Path, default=REPO / "assets" / "tiny" / "hypernet")
    ap.add_argument("--n", type=int, default=6, help="eval identities (the first N)")
    ap.add_argument("--seeds", type=int, default=2, help="generations per column group")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "hypernet_samples.png")
    args = ap.parse_args(argv)
    from PIL import Image

    predictor = Predictor.load(args.checkpoint)
    ds = load_adapter_dataset(args.dataset, token_dim=predictor.layout.token_dim, splits=("eval",))
    pipe = load_pipeline(ds.recipe.get("base", "tiny"))
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    caption, seeds = ds.recipe.get("caption", "a photo of sks person"), list(range(args.seeds))

    def gen(adapter) -> np.ndarray:
        return generate_with(pipe, adapter, caption, seeds, steps=20, guidance=3.0, size=size)  # (K, s, s, 3)

    rows = []
    for row in range(min(args.n, len(ds.records))):
        hyper = predictor.predict_batch([ds.data.cond[row]])[0]
        cells = [gen(None), gen(hyper), gen(ds.adapter(row))]
        rows.append(np.concatenate([np.concatenate(list(c), axis=1) for c in cells], axis=1))
        print(ds.records[row]["identity"], flush=True)
    grid = np.concatenate(rows, axis=0)
    scale = max(1, 128 // size)
    img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.Resampling.NEAREST)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    img.save(args.out)
    print(f"columns: base x{args.seeds} | hypernet x{args.seeds} | oracle x{args.seeds} -> {args.out}")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(2)
    raise SystemExit(main())
