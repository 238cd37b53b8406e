"""Read a ``difflora data build`` output directory as hypernetwork training data.

Each ok record of ``manifest.jsonl`` gives one row: its adapter (``adapters/<id>.safetensors``) as tokens and
its training photos' face embeddings as condition tokens. The split comes from the record (``train`` / ``val``
/ ``eval``, decided by :mod:`pipeline_data.splits`); ``eval`` identities are never trained on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from weights.adapter import Adapter
from weights.formats.native import load_native
from weights.spec import AdapterSpec
from weights.tokens import TokenLayout, adapter_to_tokens, split_template

from .data import HypernetDataset


@dataclass
class AdapterDataset:
    """Tokens + conditions of a built dataset, with what is needed to turn tokens back into adapters."""

    data: HypernetDataset  # rows in ``records`` order
    records: list[dict]  # the manifest records of the rows
    layout: TokenLayout  # token layout shared by every adapter
    spec: AdapterSpec  # the adapters' spec
    template: Adapter  # frozen tensors shared by every identity (empty for LoRA)
    recipe: dict  # the build's config.json
    face_backend: str  # backend of the condition embeddings

    def split(self, *names: str) -> HypernetDataset:
        return self.data.subset(split_rows(self.records, names))

    def adapter(self, row: int, tokens: torch.Tensor | None = None) -> Adapter:
        from weights.tokens import tokens_to_adapter

        t = self.data.tokens[row] if tokens is None else tokens
        return tokens_to_adapter(t, self.layout, self.spec, self.template)


def split_rows(records: Sequence[dict], names: Sequence[str]) -> list[int]:
    """Rows of the records whose split is one of ``names`` (a ValueError when there is none)."""
    idx = [i for i, r in enumerate(records) if r.get("split") in names]
    if not idx:
        raise ValueError(f"no identity of split {tuple(names)} in the dataset")
    return idx


def read_manifest(directory: str | Path) -> list[dict]:
    path = Path(directory) / "manifest.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not an adapter dataset: manifest.jsonl is missing")
    from pipeline_data.build import record_source

    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for r in recs:  # photo folders: older datasets store them relative to the build's working directory
        if r.get("source"):
            r["source"] = str(record_source(r, directory))
    return recs


def read_recipe(directory: str | Path) -> dict:
    """A dataset's build config (its ``config.json``; {} when it has none)."""
    path = Path(directory) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def usable_records(directory: Path, splits: Sequence[str] | None, min_gain: float | None) -> list[dict]:
    """The ok records of a dataset (optionally only ``splits``; optionally without identities whose identity-check
    gain is below ``min_gain``, those without check figures kept); a ValueError when none is left."""
    recs = [r for r in read_manifest(directory) if r.get("status") == "ok"]
    if splits is not None:
        recs = [r for r in recs if r.get("split") in splits]
    if min_gain is not None:
        recs = [r for r in recs if "check" not in r or r["check"]["gain"] >= min_gain]
    if not recs:
        raise ValueError(f"{directory}: no usable identities (splits={splits}, min_gain={min_gain})")
    return recs


def load_adapter_dataset(
    directory: str | Path,
    *,
    token_dim: int = 64,
    splits: Sequence[str] | None = None,
    min_gain: float | None = None,
    canonicalize: bool = False,
) -> AdapterDataset:
    """Load every ok identity (optionally only ``splits``; optionally dropping identities whose identity-check
    gain is below ``min_gain`` — identities without check figures are kept). Factors stay raw unless
    ``canonicalize``: the build trains every identity from one seeded init, so raw factors share one gauge."""
    d = Path(directory)
    recs = usable_records(d, splits, min_gain)
    recipe = read_recipe(d)
    adapters = [load_native(d / r["adapter"]) for r in recs]
    spec = adapters[0].spec
    bad = [r["identity"] for r, a in zip(recs, adapters) if a.spec.hash() != spec.hash()]
    if bad:
        raise ValueError(f"{d}: adapters with another spec than the first: {bad[:5]}")
    _, template = split_template(adapters[0])
    layout = TokenLayout.from_adapter(adapters[0], token_dim, canonicalize)
    tokens = torch.stack([adapter_to_tokens(a, layout) for a in adapters])  # (N, T, D)
    cond = [torch.tensor(r["embeddings"], dtype=torch.float32) for r in recs]  # (P_i, E) each
    data = HypernetDataset.from_tensors(
        tokens, cond, names=[r["identity"] for r in recs], mask=layout.mask, layer_ids=layout.layer_ids
    )
    return AdapterDataset(data, recs, layout, spec, template, recipe, recipe.get("face_backend", "dlib"))
