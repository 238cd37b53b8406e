"""Bad values given to ``difflora hypernet train|eval|tune`` and ``difflora predict``: each is refused up front
with one line naming the option (exit 2), before any dataset, checkpoint or photo is read or any file written."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from hypernet.cli import main, predict_main
from hypernet.config import HypernetConfig, get_preset
from hypernet.evaluate import EvalConfig
from hypernet.strict_json import dumps
from hypernet.table import tabulate, write_results
from pipeline_data.cliargs import MAX_SEED


def _refused(rc: int, err: str, message: str) -> None:
    assert rc == 2, err
    assert message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def _eval(tmp_path: Path, *extra: str) -> list[str]:
    """eval arguments whose dataset and checkpoint do not exist: only a check made first can name the option."""
    ds, ck = tmp_path / "no-dataset", tmp_path / "no-checkpoint"
    return ["eval", "--dataset", str(ds), "--checkpoint", str(ck), "--out", str(tmp_path / "q.json"), *extra]


def _tune(tmp_path: Path, *extra: str) -> list[str]:
    return ["tune", "--dataset", str(tmp_path / "no-dataset"), "--checkpoint", str(tmp_path / "no-ck"), *extra]


@pytest.mark.parametrize(
    ("command", "extra", "message"),
    [
        (_eval, ["--seeds", "0"], "--seeds must be >= 1, got 0"),
        (_eval, ["--seeds", "-3"], "--seeds must be >= 1, got -3"),
        (_eval, ["--sample-steps", "0"], "--sample-steps must be >= 1, got 0"),
        (_eval, ["--samples", "0"], "--samples must be >= 1"),
        (_eval, ["--limit", "-1"], "--limit must be >= 1"),
        (_eval, ["--mlp-epochs", "0"], "--mlp-epochs must be >= 1"),
        (_eval, ["--cfg-scale", "nan"], "--cfg-scale must be a finite number, got nan"),
        (_eval, ["--cfg-scale", "inf"], "--cfg-scale must be a finite number, got inf"),
        (_eval, ["--mlp-scales", "2,nan"], "--mlp-scales must be a finite number"),
        (_tune, ["--seeds", "0"], "--seeds must be >= 1, got 0"),
        (_tune, ["--seeds", "-1"], "--seeds must be >= 1, got -1"),
        (_tune, ["--cfg-scales", "1,nan"], "--cfg-scales must be a finite number, got nan"),
        (_tune, ["--cfg-scales", "inf"], "--cfg-scales must be a finite number, got inf"),
        (_tune, ["--steps", "1,0"], "--steps must be >= 1, got 0"),
        (_tune, ["--samples", "-2"], "--samples must be >= 1, got -2"),
        (_tune, ["--max-no-face-increase", "nan"], "--max-no-face-increase must be a finite number"),
        (_tune, ["--max-no-face-increase", "-0.1"], "--max-no-face-increase must be >= 0"),
    ],
)
def test_eval_and_tune_refuse_bad_numbers(tmp_path, capsys, command, extra, message):
    rc = main(command(tmp_path, *extra))
    _refused(rc, capsys.readouterr().err, message)
    assert not (tmp_path / "q.json").exists()


def test_eval_checks_its_out_file_before_evaluating(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for out, message in [
        (tmp_path / "file" / "q.json", "is not a folder"),  # its folder cannot be created
        (tmp_path / "file" / "sub" / "q.json", "cannot be created"),
        (tmp_path, "is a folder; give a file name"),
    ]:
        argv = ["eval", "--dataset", str(tmp_path / "no-ds"), "--checkpoint", str(tmp_path / "no-ck")]
        _refused(main([*argv, "--out", str(out)]), capsys.readouterr().err, message)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_eval_refuses_an_unwritable_out_folder(tmp_path, capsys):
    # /proc/self accepts no new file even for root: a real folder that cannot be written
    argv = ["eval", "--dataset", str(tmp_path / "no-ds"), "--checkpoint", str(tmp_path / "no-ck")]
    _refused(main([*argv, "--out", "/proc/self/q.json"]), capsys.readouterr().err, "--out: cannot write into")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_in_a_read_only_folder_is_refused(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        argv = ["eval", "--dataset", str(tmp_path / "no-ds"), "--checkpoint", str(tmp_path / "no-ck")]
        _refused(main([*argv, "--out", str(ro / "q.json")]), capsys.readouterr().err, "cannot write into")
        argv = ["tune", "--dataset", str(tmp_path / "no-ds"), "--checkpoint", str(ro)]  # tune writes into it
        _refused(main(argv), capsys.readouterr().err, "--checkpoint (tune writes its choice into it): cannot write")
        argv = ["train", "--synthetic-demo", "--out", str(ro / "run"), "--no-progress"]
        _refused(main(argv), capsys.readouterr().err, "--out: cannot write into")
    finally:
        ro.chmod(0o755)


def _train(tmp_path: Path, *extra: str) -> list[str]:
    return ["train", "--synthetic-demo", "--out", str(tmp_path / "run"), "--no-progress", "--device", "cpu", *extra]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "sampling.cfg_scale=abc"], "sampling.cfg_scale must be a number, got 'abc'"),
        (["--set", "sampling.cfg_scale=nan"], "sampling.cfg_scale must be a number, got 'nan'"),
        (["--set", "sampling.cfg_scale=NaN"], "sampling.cfg_scale must be a finite number, got nan"),
        (["--set", "train.dn_lr=Infinity"], "train.dn_lr must be a finite number, got inf"),
        (["--set", "sampling.steps=2.5"], "sampling.steps must be an integer, got 2.5"),
        (["--set", "sampling.steps=true"], "sampling.steps must be an integer, got True"),
        (["--set", "denoiser.schedule=3"], "denoiser.schedule must be a string, got 3"),
        (["--set", "train.betas=[0.9]"], "train.betas must be a list of 2 values"),
        (["--set", 'train.betas=[0.9, "x"]'], "train.betas[1] must be a number"),
        (["--num-identities", "0"], "--num-identities must be >= 3"),
        (["--num-identities", "-5"], "--num-identities must be >= 3"),
        (["--mlp-steps", "0"], "--mlp-steps must be >= 1"),
        (["--seed", "-1"], "--seed must be in 0 .. 9223372036854775807"),
        (["--seed", str(2**64)], "--seed must be in 0 .. "),
        (["--device", "foo"], "unknown device 'foo'"),
        (["--device", "cuda:x"], "unknown device 'cuda:x'"),
        (["--device", "cuda:99"], "device 'cuda:99'"),
    ],
)
def test_train_refuses_bad_values_before_training(tmp_path, capsys, extra, message):
    rc = main([*_train(tmp_path), *extra])  # a later --device overrides the default cpu
    _refused(rc, capsys.readouterr().err, message)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_train_on_cuda_without_cuda_is_refused(tmp_path, capsys):
    _refused(main(_train(tmp_path, "--device", "cuda")), capsys.readouterr().err, "CUDA is not available")
    argv = ["train", "--dataset", str(tmp_path / "no-ds"), "--out", str(tmp_path / "run"), "--device", "cuda"]
    _refused(main(argv), capsys.readouterr().err, "CUDA is not available")  # before the dataset is read


def test_train_out_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "run").write_text("not a folder")
    _refused(main(_train(tmp_path)), capsys.readouterr().err, "--out: ")
    assert (tmp_path / "run").read_text() == "not a folder"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--steps", "-4"], "--steps must be >= 1, got -4"),
        (["--seed", "99999999999999999999999"], "--seed must be in 0 .. 9223372036854775807"),
        (["--seed", str(MAX_SEED + 1)], "--seed must be in 0 .. "),
        (["--seed", "-1"], "--seed must be in 0 .. "),
        (["--rank", "0"], "--rank must be >= 1, got 0 (leave it out to keep the adapter's rank)"),
        (["--rank", "-1"], "--rank must be >= 1, got -1"),
        (["--rank", "2", "--format", "native"], "--rank applies to the LoRA formats"),
    ],
)
def test_predict_refuses_bad_values(tmp_path, capsys, extra, message):
    argv = ["photo.jpg", "--out", str(tmp_path / "a.safetensors"), "--checkpoint", str(tmp_path / "none"), *extra]
    _refused(predict_main(argv), capsys.readouterr().err, message)


def test_predict_checks_its_out_path(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    base = ["photo.jpg", "--checkpoint", str(tmp_path / "none")]
    _refused(predict_main([*base, "--out", str(tmp_path)]), capsys.readouterr().err, "is a folder")
    argv = [*base, "--out", str(tmp_path / "file"), "--format", "peft"]  # peft writes a folder
    _refused(predict_main(argv), capsys.readouterr().err, "is not a folder")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"sampling.cfg_scale": "abc"}, "sampling.cfg_scale must be a number"),
        ({"sampling.cfg_scale": math.nan}, "sampling.cfg_scale must be a finite number"),
        ({"autoencoder.latent_tokens": 2.0}, "autoencoder.latent_tokens must be an integer"),
    ],
)
def test_config_values_are_type_checked(settings, message):
    with pytest.raises(ValueError, match=message):
        get_preset("tiny").with_overrides(settings)
    d = get_preset("tiny").to_dict()
    section, _, name = next(iter(settings)).partition(".")
    d[section][name] = next(iter(settings.values()))
    with pytest.raises(ValueError, match=message):
        HypernetConfig.from_dict(d)  # a checkpoint's config.json is checked the same way


def test_config_accepts_its_own_files():
    for name in ("tiny", "sd15", "sdxl"):
        cfg = get_preset(name)
        assert HypernetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    cfg = get_preset("tiny").with_overrides(["sampling.cfg_scale=2", "autoencoder.kind=transformer"])
    assert cfg.sampling.cfg_scale == 2 and cfg.autoencoder.kind == "transformer"  # an int is a valid float


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the bootstrap interval of 0/0
def test_written_json_is_strict_and_keeps_finite_values(tmp_path):
    """NaN/inf (e.g. identity recovery when no oracle gained anything) are written as null, never bare NaN."""
    obj = {"a": 0.1 + 0.2, "b": [math.nan, 1e-300, -math.inf], "c": {"d": (1, 2.5)}, "e": None}
    text = dumps(obj, indent=2, sort_keys=True)
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert back == {"a": 0.1 + 0.2, "b": [None, 1e-300, None], "c": {"d": [1, 2.5]}, "e": None}
    finite = {"x": [0.30000000000000004, 2.0, 1e-7], "y": {"z": -3}}
    assert dumps(finite, indent=2, sort_keys=True) == json.dumps(finite, indent=2, sort_keys=True)

    m = {"sim": 0.5, "function_fidelity": 0.1, "function_fidelity_heldout": 0.1, "function_cosine": 0.2,
         "weight_cosine": 0.3, "no_face": 0.0}  # fmt: skip
    per = {c: {"id0": dict(m), "id1": dict(m)} for c in ("base", "oracle", "hypernet", "mean")}
    res = tabulate(per, {}, EvalConfig())  # the oracle gains nothing: recovery is 0/0
    assert math.isnan(res["hypernet"]["identity_recovery"])
    out = tmp_path / "q.json"
    write_results(res, out)
    back = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"bare {c} in {out}"))
    assert back["hypernet"]["identity_recovery"] is None
    assert back["baselines"]["mean"]["weight_cosine"] == 0.3 and back["n_identities"] == 2
