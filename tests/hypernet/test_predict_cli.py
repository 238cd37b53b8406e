"""``difflora predict`` and ``difflora hypernet eval`` from the command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from hypernet.cli import main, predict_main
from hypernet.predict import Predictor
from pipeline_data.models import load_pipeline
from pipeline_data.recipe import BuildConfig
from tests.utils.datasets import FACES
from weights.io import load_any

OBAMA = sorted(str(p) for p in (FACES / "photos").glob("obama*.jpg"))[:3]


@pytest.fixture(scope="module")
def checkpoint(tiny_dataset: Path, tmp_path_factory) -> Path:
    recipe = BuildConfig.from_dict(json.loads((tiny_dataset / "config.json").read_text()))
    out = tmp_path_factory.mktemp("hn") / "ckpt"
    p = Predictor.untrained(load_pipeline(recipe.base), recipe)
    p.hypernet.model.token_std.fill_(0.01)  # a non-trivial (random) hypernet output
    p.save(out)
    return out


@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "native"])
def test_predict_writes_a_loadable_adapter(checkpoint: Path, tmp_path: Path, fmt: str, capsys) -> None:
    out = tmp_path / f"obama.{fmt}.safetensors"
    rc = predict_main([*OBAMA, "--out", str(out), "--format", fmt, "--checkpoint", str(checkpoint), "--steps", "3"])
    assert rc == 0, capsys.readouterr().err
    assert "from 3 photos" in capsys.readouterr().out
    a = load_any(out)
    assert a.spec.layers and all(torch.isfinite(t).all() for t in a.tensors.values())


def test_predict_bad_input_is_one_line(checkpoint: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "x.jpg"
    bad.write_text("not an image")
    rc = predict_main([str(bad), "--out", str(tmp_path / "o.safetensors"), "--checkpoint", str(checkpoint)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    rc = predict_main([*OBAMA, "--out", str(tmp_path / "o.safetensors"), "--checkpoint", str(tmp_path / "none")])
    assert rc == 2 and "is not a hypernetwork checkpoint" in capsys.readouterr().err


def test_hypernet_eval_cli(tiny_dataset: Path, checkpoint: Path, tmp_path: Path, capsys) -> None:
    ds = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds)
    recs = [json.loads(x) for x in (ds / "manifest.jsonl").read_text().splitlines()]
    for r in recs:
        r["split"] = "eval" if r["identity"] == "lfw__Aaron_Peirsol" else "train"
    (ds / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "quality.json"
    rc = main(["eval", "--dataset", str(ds), "--checkpoint", str(checkpoint), "--out", str(out), "--seeds", "1",
               "--sample-steps", "2", "--mlp-epochs", "3"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    assert res["n_identities"] == 1 and set(res["baselines"]) == {"base", "mean", "nearest", "mlp", "oracle"}
    assert "hypernet" in capsys.readouterr().out
