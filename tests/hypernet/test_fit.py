"""Training on a built adapter dataset exports a predictor that loads and predicts adapters of that dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hypernet.fit import train_on_dataset
from hypernet.predict import RECIPE_NAME, Predictor
from pipeline_data.build import load_dataset_adapters


def test_train_on_dataset_exports_a_working_predictor(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "hn"
    overrides = {
        "ae_steps": 15,
        "dn_steps": 15,
        "batch_size": 4,
        "eval_every": 10,
        "ckpt_every": 10,
    }
    res = train_on_dataset(
        tiny_dataset, out, token_dim=128, overrides=overrides, settings=["sampling.steps=3"], progress=False
    )
    assert res["train_identities"] >= 1 and res["tokens"][1] == 128
    flags = json.loads((out / RECIPE_NAME).read_text())
    assert flags["--method"] == "lora" and flags["--rank"] == 4 and "--faces" not in flags and "--base" not in flags
    p = Predictor.load(out)
    stored = next(iter(load_dataset_adapters(tiny_dataset).values()))
    a = p.predict(np.random.default_rng(0).normal(size=(2, 128)).astype(np.float32), steps=3)
    assert a.spec.hash() == stored.spec.hash()
    assert a.tensors.keys() == stored.tensors.keys()
    assert all(np.isfinite(t.numpy()).all() for t in a.tensors.values())
