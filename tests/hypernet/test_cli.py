"""``difflora hypernet`` command line."""

from __future__ import annotations

import json

import pytest

from hypernet.cli import main


def test_train_synthetic_demo_run(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--synthetic", "--out", str(out), "--ae-steps", "4", "--dn-steps", "4", "--batch-size", "8",
            "--num-identities", "40", "--mlp-steps", "5", "--no-progress", "--device", "cpu",
            "--set", "autoencoder.latent_tokens=3", "--set", "train.sample_count=2"]  # fmt: skip
    assert main(argv) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["autoencoder"]["latent_tokens"] == 3 and saved["train"]["sample_count"] == 2
    assert saved["autoencoder"]["kind"] == "transformer" and saved["train"]["ae_steps"] == 4  # the demo's LAE
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


@pytest.mark.parametrize(
    ("setting", "message"),
    [("autoencoder.latent_toks=8", "unknown hypernet setting"), ("latent_tokens", "SECTION.FIELD=VALUE"),
     ("denoiser.schedule=\"square\"", "schedule"), ("train.sample_count=0", "sample_count")],
)  # fmt: skip
def test_bad_settings_are_named(tmp_path, capsys, setting, message):
    argv = ["train", "--synthetic", "--out", str(tmp_path), "--set", setting, "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_library_errors_are_one_line(tmp_path, capsys):
    argv = ["train", "--synthetic", "--out", str(tmp_path), "--batch-size", "0", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "batch_size" in err and "Traceback" not in err


def test_synthetic_eval_json_is_replaced_atomically(tmp_path, capsys):
    """The table replaces an earlier one in one step (temp file + rename): a reader of the old file never sees a
    truncated or half-written one."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "synthetic_eval.json").write_text('{"old": true}\n')
    with open(out / "synthetic_eval.json") as old:
        argv = ["train", "--synthetic", "--out", str(out), "--ae-steps", "2", "--dn-steps", "2", "--batch-size", "8",
                "--num-identities", "20", "--mlp-steps", "2", "--no-progress", "--device", "cpu"]  # fmt: skip
        assert main(argv) == 0, capsys.readouterr().err
        assert old.read() == '{"old": true}\n'  # the old file was replaced, not rewritten in place
    table = json.loads((out / "synthetic_eval.json").read_text())
    assert set(table) == {"hypernet", "mean", "nearest", "mlp"}
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
