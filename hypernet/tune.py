"""Choose the predictor's sampling options (CFG scale, samples averaged, DDIM steps) on ``val`` identities.

Every option is scored by identity recovery on validation identities (never ``eval``: the table's identities stay
untouched) in one pass (base and oracle generated once); the best is written into the checkpoint's
``sampling.json`` (its only file that changes), which :class:`hypernet.predict.Predictor` uses as its defaults,
and every score into ``tuning.json`` beside it.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

from pipeline_data.cliargs import finite, positive, writable_dir
from weights.atomic import atomic_write_text

from .checkpoint import load_config, save_sampling
from .config import SamplingConfig
from .evaluate import EvalConfig, evaluate, variant_name
from .strict_json import dumps

TUNING_NAME = "tuning.json"


def choose_option(scores: list[dict], base_no_face: float, max_no_face_increase: float) -> tuple[dict, bool]:
    """The best-scoring option among those within the no-face bound (all of them if none is); returns it and
    whether the bound could be met. Ties go to the fewest samples, then steps, then the scale closest to 1."""

    def key(s: dict) -> tuple:
        rec = s["identity_recovery"]
        return (-(rec if math.isfinite(rec) else -math.inf), s["samples"], s["sample_steps"], abs(s["cfg_scale"] - 1))

    eligible = [s for s in scores if s["no_face_rate"] - base_no_face <= max_no_face_increase]
    return min(eligible or scores, key=key), bool(eligible)


def tune_sampling(
    dataset_dir: str | Path,
    checkpoint_dir: str | Path,
    *,
    cfg_scales: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0),
    samples: tuple[int, ...] = (1,),
    sample_steps: tuple[int, ...] = (1, 25),
    limit: int | None = 16,
    seeds: int = 4,
    max_no_face_increase: float = 0.02,
    write: bool = True,
    progress: bool = False,
) -> dict:
    """Score every (cfg_scale, samples, sample_steps) option on val identities; returns (and writes) the scores
    and the choice.

    Options whose generations lose the face more often than the base model's by over ``max_no_face_increase``
    are not chosen (a large CFG scale can push the adapter off the image manifold and still score on the
    faces that remain). Ties (e.g. an untrained hypernet, whose every option gives zero gain) go to the cheapest
    option: the lowest sample count, then the fewest steps, then the scale closest to 1.
    """
    if not cfg_scales or not samples or not sample_steps:
        raise ValueError("give at least one CFG scale, one sample count and one step count")
    if min(samples) < 1 or min(sample_steps) < 1:
        raise ValueError("sample counts and step counts must be >= 1")
    for c in cfg_scales:
        finite(c, "CFG scale")
    positive(seeds, "seeds")
    finite(max_no_face_increase, "max_no_face_increase", lo=0.0)
    if write:  # the choice goes into the checkpoint: find out now, not after the evaluation
        load_config(checkpoint_dir)
        writable_dir(checkpoint_dir, "checkpoint")
    pairs = [(float(c), int(n), int(k)) for c, n, k in itertools.product(cfg_scales, samples, sample_steps)]
    # one pass: base, oracle and every variant on the same identities and seeds (base/oracle generated once)
    ecfg = EvalConfig(
        seeds=seeds, limit=limit, split="val", baselines=(), cfg_scale=pairs[0][0], samples=pairs[0][1],
        sample_steps=pairs[0][2], variants=tuple(pairs[1:]), progress=progress, refine_steps=(), refit=False,
    )  # fmt: skip
    res = evaluate(dataset_dir, checkpoint_dir, ecfg)
    scores = _option_scores(res, pairs)
    base_no_face = res["baselines"]["base"]["no_face_rate"]
    best, eligible = choose_option(scores, base_no_face, max_no_face_increase)
    out = {
        "split": "val", "seeds": seeds, "limit": limit, "scores": scores, "chosen": best,
        "base_no_face_rate": base_no_face, "max_no_face_increase": max_no_face_increase,
        "no_face_constraint_met": eligible,
    }  # fmt: skip
    if write:
        d = Path(checkpoint_dir)
        chosen = SamplingConfig(steps=best["sample_steps"], cfg_scale=best["cfg_scale"], samples=best["samples"])
        save_sampling(chosen, d)
        atomic_write_text(d / TUNING_NAME, dumps(out, indent=2, sort_keys=True) + "\n")
    return out


def _option_scores(res: dict, pairs: list[tuple[float, int, int]]) -> list[dict]:
    """One score row per (cfg_scale, samples, sample_steps) option from the evaluation result (the first option is
    its hypernet row, the others its variants)."""
    scores = []
    for scale, n, steps in pairs:
        h = res["hypernet"] if (scale, n, steps) == pairs[0] else res["variants"][variant_name(scale, n, steps)]
        scores.append(
            {
                "cfg_scale": scale,
                "samples": n,
                "sample_steps": steps,
                "identity_recovery": h["identity_recovery"],
                "identity_recovery_ci95": h["identity_recovery_ci95"],
                "function_fidelity": h["function_fidelity"],
                "no_face_rate": h["no_face_rate"],
                "n_identities": res["n_identities"],
            }
        )
    return scores
