"""``difflora hypernet`` command line."""

from __future__ import annotations

import json

import pytest

from hypernet.cli import main


def test_train_synthetic_demo_run(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--synthetic-demo", "--out", str(out), "--ae-steps", "4", "--dn-steps", "4", "--batch-size", "8",
            "--num-identities", "40", "--mlp-steps", "5", "--no-progress", "--device", "cpu",
            "--set", "autoencoder.latent_tokens=3", "--set", "sampling.samples=2"]  # fmt: skip
    assert main(argv) == 0
    saved = json.loads((out / "config.json").read_text())
    assert (
        saved["autoencoder"]["latent_tokens"] == 3 and "sampling" not in saved and "sample_count" not in saved["train"]
    )
    assert json.loads((out / "sampling.json").read_text()) == {"steps": 25, "cfg_scale": 1.0, "samples": 2}
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
        ["train", "--synthetic-demo"],
        ["train", "--synthetic-demo", "--out", "x", "--preset", "huge"],
        ["evaluate"],
    ],
)
def test_bad_arguments_return_nonzero(argv, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err


@pytest.mark.parametrize(
    ("setting", "message"),
    [("autoencoder.latent_toks=8", "unknown hypernet setting"), ("latent_tokens", "SECTION.FIELD=VALUE"),
     ("denoiser.schedule=\"square\"", "schedule"), ("sampling.samples=0", "sampling samples must be >= 1"),
     ("train.sample_count=2", "unknown hypernet setting 'train.sample_count'"),
     ("autoencoder.ridge=2", "autoencoder.ridge has no effect with autoencoder.kind=transformer")],
)  # fmt: skip
def test_bad_settings_are_named(tmp_path, capsys, setting, message):
    argv = ["train", "--synthetic-demo", "--out", str(tmp_path), "--set", setting, "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_library_errors_are_one_line(tmp_path, capsys):
    argv = ["train", "--synthetic-demo", "--out", str(tmp_path), "--batch-size", "0", "--no-progress"]
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
        argv = ["train", "--synthetic-demo", "--out", str(out), "--ae-steps", "2", "--dn-steps", "2",
                "--batch-size", "8", "--num-identities", "20", "--mlp-steps", "2", "--no-progress",
                "--device", "cpu"]  # fmt: skip
        assert main(argv) == 0, capsys.readouterr().err
        assert old.read() == '{"old": true}\n'  # the old file was replaced, not rewritten in place
    table = json.loads((out / "synthetic_eval.json").read_text())
    assert set(table) == {"hypernet", "mean", "nearest", "mlp"}
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "--dataset DIR is required"),  # no silent fall-back to the synthetic demo
        (["--dataset", "{tmp}", "--ae-steps", "5"], "--ae-steps has no effect with autoencoder.kind=linear"),
        (["--dataset", "{tmp}", "--set", "autoencoder.depth_enc=3"], "autoencoder.depth_enc has no effect"),
    ],
)
def test_train_needs_the_real_data_and_refuses_ignored_knobs(tmp_path, capsys, extra, message):
    argv = [
        "train",
        "--out",
        str(tmp_path / "o"),
        "--no-progress",
        *[a.replace("{tmp}", str(tmp_path)) for a in extra],
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()
