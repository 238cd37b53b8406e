"""PNG plots of a training run's ``metrics.jsonl`` (matplotlib, Agg backend; skipped if matplotlib is absent)."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline_data.plots import pyplot, save_png, style_axis

PANELS = (  # (title, stage, train key, validation keys)
    ("autoencoder", "autoencoder", "loss", ("val_ae_rel_mse",)),
    ("denoiser", "denoiser", "loss", ("val_dn_loss",)),
)


def plot_metrics(jsonl: str | Path, png: str | Path) -> bool:
    """Plot training loss and validation metrics per stage. Returns False if matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return False
    recs = [json.loads(ln) for ln in Path(jsonl).read_text().splitlines() if ln.strip()]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.5))
    for ax, (title, stage, key, val_keys) in zip(axes, PANELS, strict=True):
        tr = [(r["step"], r[key]) for r in recs if r.get("stage") == stage and r.get(key) is not None]
        if tr:
            ax.plot(*zip(*tr, strict=True), label=f"train {key}", lw=1)
        for vk in val_keys:
            va = [(r["step"], r[vk]) for r in recs if r.get(vk) is not None]  # null: a non-finite value
            if va:
                ax.plot(*zip(*va, strict=True), "o-", label=vk, ms=3)
        style_axis(ax, title)
    save_png(fig, png)
    return True
