"""The evaluation table from per-identity scores: rows with bootstrap intervals, the result dict, JSON + chart.

Split from :mod:`hypernet.evaluate` (which scores the candidates); the metrics are defined in its docstring.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from pipeline_data.stats import mean_ci, ratio_ci

from .strict_json import dumps

CANDIDATES = ("base", "mean", "nearest", "mlp", "autoencoder", "hypernet", "oracle")
COLORS = {"base": "#999", "hypernet": "#c33", "oracle": "#36c", "autoencoder": "#e9a"}  # others: light grey


def summarize_candidates(per: dict[str, dict[str, dict]], seconds: dict[str, float] | None = None) -> dict:
    """Per-candidate rows of the table from per-identity metrics ``per[candidate][identity]`` (as returned by
    :func:`score_candidates`; needs ``base`` and ``oracle``): recovery and fidelity with bootstrap intervals,
    identity gain, mean weight cosine, no-face rate and seconds per identity."""
    ids = list(per["oracle"])
    base = np.array([per["base"][i]["sim"] for i in ids])
    oracle_gain = np.array([per["oracle"][i]["sim"] for i in ids]) - base
    rows = {}
    gain_h = np.array([per["hypernet"][i]["sim"] for i in ids]) - base if "hypernet" in per else None
    base_l = [per["base"][i].get("heldout_loss") for i in ids]
    oracle_l = [per["oracle"][i].get("heldout_loss") for i in ids]
    base_loss = np.array(base_l, dtype=float) if None not in base_l else None
    oracle_loss = np.array(oracle_l, dtype=float) if None not in oracle_l else None
    for c in per:
        gain = np.array([per[c][i]["sim"] for i in ids]) - base
        recovery = ratio_ci(gain, oracle_gain)
        # the hypernet's recovery minus c's, paired over identities (the "above nearest neighbour" target)
        adv = ratio_ci(gain_h - gain, oracle_gain) if gain_h is not None and c != "hypernet" else None
        fidelity = mean_ci([per[c][i]["function_fidelity"] for i in ids])
        loss = [per[c][i].get("heldout_loss") for i in ids]  # tables scored before the field have none
        have = base_loss is not None and oracle_loss is not None and None not in loss
        loss_gain = ratio_ci(base_loss - np.array(loss, dtype=float), base_loss - oracle_loss) if have else None
        held = [per[c][i].get("function_fidelity_heldout") for i in ids]
        held = mean_ci(held) if None not in held else None  # tables scored before the field have none
        rows[c] = {
            "identity_recovery": recovery["mean"],
            "identity_recovery_ci95": recovery["ci95"],
            "identity_gain": mean_ci(list(gain)),
            "function_fidelity": fidelity["mean"],
            "function_fidelity_ci95": fidelity["ci95"],
            **(
                {
                    "function_fidelity_heldout": held["mean"],
                    "function_fidelity_heldout_ci95": held["ci95"],
                    "function_cosine": float(np.mean([per[c][i]["function_cosine"] for i in ids])),
                }
                if held
                else {}
            ),
            **(
                {"heldout_loss_gain": loss_gain["mean"], "heldout_loss_gain_ci95": loss_gain["ci95"]}
                if loss_gain
                else {}
            ),
            "weight_cosine": float(np.mean([per[c][i]["weight_cosine"] for i in ids])),
            "no_face_rate": float(np.mean([per[c][i]["no_face"] for i in ids])),
            "seconds_per_identity": (seconds or {}).get(c, 0.0),
            **({"hypernet_recovery_advantage": adv} if adv else {}),
        }
    return rows


def tabulate(per: dict, seconds: dict, cfg: Any) -> dict:
    """The result dict of :func:`hypernet.evaluate.evaluate` (``cfg``: its EvalConfig)."""
    rows = summarize_candidates(per, seconds)
    h = rows["hypernet"]
    variants = {c: rows[c] for c in rows if c not in CANDIDATES}
    return {
        "identity_recovery": h["identity_recovery"],
        "function_fidelity": h["function_fidelity"],
        **({"heldout_loss_gain": h["heldout_loss_gain"]} if "heldout_loss_gain" in h else {}),
        "n_identities": len(per["oracle"]),
        "hypernet": h,
        "baselines": {c: rows[c] for c in rows if c in CANDIDATES and c != "hypernet"},
        **({"variants": variants} if variants else {}),
        "split": cfg.split,
        "config": asdict(cfg),
        "per_identity": per,
    }


def write_results(res: dict, out_file: str | Path) -> None:
    """JSON (atomic) plus a PNG bar chart next to it."""
    from weights.atomic import atomic_write_bytes

    out = Path(out_file)
    atomic_write_bytes(out, (dumps(res, indent=2, sort_keys=True) + "\n").encode())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {**res["baselines"], "hypernet": res["hypernet"]}
    names = [c for c in CANDIDATES if c in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key in zip(axes, ("identity_recovery", "function_fidelity")):
        vals = [rows[n][key] for n in names]
        ci = np.array([rows[n][f"{key}_ci95"] for n in names]).T
        err = np.abs(ci - np.array(vals)[None])
        ax.bar(names, vals, yerr=err, color=[COLORS.get(n, "#bbb") for n in names])
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(f"{key.replace('_', ' ')} ({res['n_identities']} held-out identities)")
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)
