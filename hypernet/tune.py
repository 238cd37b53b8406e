"""Choose the predictor's sampling options (CFG scale, samples averaged) on the dataset's ``val`` identities.

Each option pair is scored by identity recovery on validation identities (never ``eval``: the table's
identities stay untouched); the best pair is written into the checkpoint's ``config.json`` (``train.cfg_scale``,
``train.sample_count``), which :class:`hypernet.predict.Predictor` uses as its defaults, and every score into
``tuning.json`` beside it.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace
from pathlib import Path

from .checkpoint import CONFIG_NAME, atomic_write_text, load_config, save_config
from .evaluate import EvalConfig, evaluate

TUNING_NAME = "tuning.json"


def tune_sampling(
    dataset_dir: str | Path,
    checkpoint_dir: str | Path,
    *,
    cfg_scales: tuple[float, ...] = (1.0, 2.0, 4.0),
    samples: tuple[int, ...] = (1, 8),
    limit: int | None = 16,
    seeds: int = 4,
    write: bool = True,
) -> dict:
    """Score every (cfg_scale, samples) pair on val identities; returns (and writes) the scores and the choice.

    Ties (e.g. an untrained hypernet, whose every option gives zero gain) go to the cheapest option: the
    lowest sample count, then the scale closest to 1.
    """
    if not cfg_scales or not samples:
        raise ValueError("give at least one CFG scale and one sample count")
    scores = []
    for scale, n in itertools.product(cfg_scales, samples):
        ecfg = EvalConfig(seeds=seeds, limit=limit, split="val", baselines=(), cfg_scale=scale, samples=n)
        res = evaluate(dataset_dir, checkpoint_dir, ecfg)
        h = res["hypernet"]
        scores.append(
            {
                "cfg_scale": scale,
                "samples": n,
                "identity_recovery": h["identity_recovery"],
                "identity_recovery_ci95": h["identity_recovery_ci95"],
                "function_fidelity": h["function_fidelity"],
                "n_identities": res["n_identities"],
            }
        )

    def key(s: dict) -> tuple:
        rec = s["identity_recovery"]
        return (-(rec if math.isfinite(rec) else -math.inf), s["samples"], abs(s["cfg_scale"] - 1.0))

    best = min(scores, key=key)
    out = {"split": "val", "seeds": seeds, "limit": limit, "scores": scores, "chosen": best}
    if write:
        d = Path(checkpoint_dir)
        cfg = load_config(d)
        cfg = replace(cfg, train=replace(cfg.train, cfg_scale=best["cfg_scale"], sample_count=best["samples"]))
        old = json.loads((d / CONFIG_NAME).read_text())
        save_config(cfg, d, {k: v for k, v in old.items() if k not in (*cfg.to_dict(), "format_version")})
        atomic_write_text(d / TUNING_NAME, json.dumps(out, indent=2, sort_keys=True) + "\n")
    return out
