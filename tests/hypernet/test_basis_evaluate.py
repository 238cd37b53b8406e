"""``hypernet eval`` of a hypernet over identity-basis codes on the tiny pipeline: the oracle is the fitted code,
the new keys (heldout_loss_gain, refit_fidelity, refine rows) are defined by the base and oracle rows, and
``--split all`` scores a dataset of new people."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hypernet.cli import main
from hypernet.evaluate import EvalConfig, evaluate

FAST = {"seeds": 1, "gen_steps": 2, "sample_steps": 2, "timesteps": (100, 500), "mlp_epochs": 3}


@pytest.fixture(scope="module")
def eval_dataset(basis_world, tmp_path_factory) -> Path:
    ds = tmp_path_factory.mktemp("basis_eval") / "ds"
    shutil.copytree(basis_world["dataset"], ds)
    lines = [json.loads(x) for x in (ds / "manifest.jsonl").read_text().splitlines()]
    for r in lines:  # hold one identity out as the eval split
        r["split"] = "eval" if r["identity"] == "orl__s1" else "train"
    (ds / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    cfg = json.loads((ds / "config.json").read_text())
    cfg["basis"] = str(Path(basis_world["basis"]).resolve())  # as built: the folder the basis was trained in
    (ds / "config.json").write_text(json.dumps(cfg))
    return ds


def test_basis_eval_table_definitions(basis_world, eval_dataset: Path) -> None:
    res = evaluate(eval_dataset, basis_world["hypernet"], EvalConfig(**FAST, refine_steps=(2,)))
    assert res["n_identities"] == 1
    b, v = res["baselines"], res["variants"]
    assert set(b) == {"base", "mean", "nearest", "mlp", "oracle"} and set(v) == {"refit", "refine_2"}
    assert b["oracle"]["function_fidelity"] == pytest.approx(1.0)  # the oracle is the fitted code's adapter
    assert b["oracle"]["heldout_loss_gain"] == pytest.approx(1.0) and b["base"]["heldout_loss_gain"] == 0.0
    assert res["heldout_loss_gain"] == res["hypernet"]["heldout_loss_gain"]
    assert res["refit_fidelity"] == v["refit"]["function_fidelity"] < 1.0  # another seed: not the same code
    assert v["refine_2"]["seconds_per_identity"] > res["hypernet"]["seconds_per_identity"] > 0
    per = res["per_identity"]["refine_2"]["orl__s1"]
    assert per["function_fidelity"] != res["per_identity"]["hypernet"]["orl__s1"]["function_fidelity"]


def test_basis_eval_split_all_and_cli(basis_world, eval_dataset: Path, tmp_path: Path, capsys) -> None:
    cfg = EvalConfig(**FAST, split="all", refine_steps=(), refit=False, limit=1)
    res = evaluate(eval_dataset, basis_world["hypernet"], cfg)
    assert res["n_identities"] == 1 and set(res["baselines"]) == {"base", "oracle"}  # no training identities given
    out = tmp_path / "all.json"
    argv = ["eval", "--dataset", str(eval_dataset), "--checkpoint", str(basis_world["hypernet"]), "--out", str(out),
            "--seeds", "1", "--sample-steps", "2", "--mlp-epochs", "3", "--limit", "2", "--split", "all",
            "--refine-rows", "", "--no-refit", "--train-dataset", str(basis_world["dataset"])]  # fmt: skip
    assert main(argv) == 0
    saved = json.loads(out.read_text())
    assert saved["n_identities"] == 2 and {"mean", "nearest", "mlp"} <= set(saved["baselines"])
    assert "loss gain" in capsys.readouterr().out
    assert main([*argv[:-2], "--split", "eval", "--train-dataset", str(eval_dataset)]) == 2
    assert "--train-dataset applies to --split all" in capsys.readouterr().err
