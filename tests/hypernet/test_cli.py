"""``difflora hypernet`` command line."""

from __future__ import annotations

import json

import pytest

from hypernet.cli import main


def test_train_synthetic_demo_run(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--synthetic", "--out", str(out), "--ae-steps", "4", "--dn-steps", "4", "--batch-size", "8",
            "--num-identities", "40", "--mlp-steps", "5", "--no-progress", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    table = json.loads((out / "synthetic_eval.json").read_text())
    assert set(table) == {"hypernet", "mean", "nearest", "mlp"}
    assert "hypernet" in capsys.readouterr().out
    assert (out / "ema.safetensors").is_file() and (out / "config.json").is_file()


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["train"],
        ["train", "--synthetic"],
        ["train", "--synthetic", "--out", "x", "--preset", "huge"],
        ["evaluate"],
    ],
)
def test_bad_arguments_return_nonzero(argv, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err


def test_library_errors_are_one_line(tmp_path, capsys):
    argv = ["train", "--synthetic", "--out", str(tmp_path), "--batch-size", "0", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "batch_size" in err and "Traceback" not in err
