"""Deterministic identity split shared by the whole stack.

Every identity ``<dataset>/<identity>`` is assigned once, by a hash of its name, to one of three splits:

* ``eval`` (~12 %): reserved for evaluating the hypernetwork. Never seen by the tiny base model, the adapter
  dataset's training split or the hypernetwork, so evaluation measures identities the whole stack has never seen.
* ``val`` (~8 %): held out for validation while training (adapter dataset / hypernet model selection).
* ``train``: everything else.

The assignment depends only on the two names, so it is stable across machines, runs and dataset sizes.
"""

from __future__ import annotations

import hashlib
from typing import Literal

Split = Literal["train", "val", "eval"]

EVAL_FRACTION = 0.12  # share of identities reserved for final evaluation
VAL_FRACTION = 0.08  # share of identities held out for validation
SPLITS: tuple[Split, ...] = ("train", "val", "eval")


def identity_key(dataset: str, identity: str) -> str:
    """The canonical ``<dataset>/<identity>`` key that the split hashes."""
    if not dataset or not identity or "/" in dataset or "/" in identity:
        raise ValueError(f"dataset and identity must be non-empty names without '/': {dataset!r}, {identity!r}")
    return f"{dataset}/{identity}"


def split_unit(dataset: str, identity: str) -> float:
    """A uniform number in [0, 1) derived from sha256 of the identity key."""
    digest = hashlib.sha256(identity_key(dataset, identity).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(dataset: str, identity: str) -> Split:
    """``"eval"``, ``"val"`` or ``"train"`` for one identity (deterministic)."""
    u = split_unit(dataset, identity)
    if u < EVAL_FRACTION:
        return "eval"
    if u < EVAL_FRACTION + VAL_FRACTION:
        return "val"
    return "train"


def is_eval(dataset: str, identity: str) -> bool:
    """True when the identity is reserved for evaluation (must not be trained on anywhere)."""
    return split_of(dataset, identity) == "eval"
