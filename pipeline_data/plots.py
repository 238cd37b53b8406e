"""PNG plots of training runs (matplotlib, Agg backend; skipped with a warning if matplotlib is absent).

``pyplot()``, ``style_axis()`` and ``save_png()`` are the shared plumbing (``hypernet.plots`` uses them too);
``plot_loss`` plots one run's per-step loss.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from weights.safetensors_io import atomic_write_bytes


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or None (with a warning) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no plot written", stacklevel=3)
        return None
    return plt


def style_axis(ax, title: str) -> None:
    """Title, step x-axis, log-scale y and a small legend: the look of every training plot."""
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend(fontsize=8)


def save_png(fig, png: str | Path) -> None:
    """Lay out, render and close ``fig``; write the PNG atomically."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=100)
    finally:
        plt.close(fig)
    atomic_write_bytes(png, buf.getvalue())


def plot_loss(steps: Sequence[int], losses: Sequence[float], png: str | Path, title: str) -> bool:
    """Per-step loss (thin) and its running mean over ~1/20 of the run (thick), log scale.

    Returns False when matplotlib is not installed or there is nothing to plot."""
    plt = pyplot() if losses else None
    if plt is None:
        return False
    y = np.asarray(losses, dtype=np.float64)
    w = max(1, len(y) // 20)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, y, lw=0.6, alpha=0.5, label="loss")
    ax.plot(list(steps)[w - 1 :], np.convolve(y, np.ones(w) / w, mode="valid"), lw=1.8, label=f"mean of {w}")
    style_axis(ax, title)
    save_png(fig, png)
    return True
