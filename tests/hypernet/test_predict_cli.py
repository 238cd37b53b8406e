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
from tests.utils.faces import FACES, needs_faces
from weights.io import export_info, load_any

OBAMA = sorted(str(p) for p in (FACES / "photos").glob("obama*.jpg"))[:3]
pytestmark = needs_faces  # every test reads the photos (or the dataset built from them)


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
    info = export_info(out)  # the file says how to prompt it (the recipe's trigger) and what it was made from
    assert (info.trigger, info.caption, info.num_images) == ("sks person", "a photo of sks person", 3)


def test_predict_title_and_trigger(checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "me.safetensors"
    argv = [*OBAMA[:1], "--out", str(out), "--checkpoint", str(checkpoint), "--steps", "2", "--format", "kohya"]
    assert predict_main([*argv, "--title", "Barack", "--trigger", "ohwx man"]) == 0, capsys.readouterr().err
    assert (export_info(out).title, export_info(out).trigger) == ("Barack", "ohwx man")
    capsys.readouterr()
    assert predict_main([*argv, "--title", "x" * 201]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--title must be printable text of at most 200 characters" in err


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


def _corrupt(checkpoint: Path, tmp_path: Path, name: str, text: str) -> Path:
    ck = tmp_path / "ck"
    shutil.copytree(checkpoint, ck)
    (ck / name).write_text(text)
    return ck


def _config_with(checkpoint: Path, section: str, key: str, value) -> str:
    d = json.loads((checkpoint / "config.json").read_text())
    d[section][key] = value
    return json.dumps(d)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("adapter_layout.json", "{}", "adapter_layout.json: expected an object with 'spec' and 'layout', got keys []"),
        ("adapter_layout.json", "[1, 2]", "adapter_layout.json: expected an object with 'spec' and 'layout', got a"),
        ("adapter_layout.json", '{"spec": 1, "layout": []}', "adapter_layout.json: invalid adapter layout"),
        ("adapter_layout.json", "{not json", "adapter_layout.json: not valid JSON"),
        ("config.json", "", "config.json: not valid JSON (Expecting value at line 1 column 1)"),
        ("config.json", "[]", "config.json: expected a JSON object"),
        ("config.json", None, "config.json: invalid hypernet config (train.dn_lr must be a number, got 'x')"),
        ("sampling.json", '{"cfg_scale": "x"}', "sampling.json: invalid hypernet config (sampling.cfg_scale must be"),
        ("sampling.json", '{"steps": 0}', "sampling.json: invalid hypernet config (sampling steps must be >= 1"),
        ("sampling.json", "[]", "sampling.json: expected a JSON object"),
    ],
)
def test_broken_checkpoint_files_are_named(checkpoint: Path, tmp_path: Path, capsys, name, text, message) -> None:
    text = _config_with(checkpoint, "train", "dn_lr", "x") if text is None else text
    ck = _corrupt(checkpoint, tmp_path, name, text)
    rc = predict_main([OBAMA[0], "--out", str(tmp_path / "o.safetensors"), "--checkpoint", str(ck)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and str(ck) in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o.safetensors").exists()


def test_predict_names_every_rejected_photo(checkpoint: Path, tmp_path: Path, capsys) -> None:
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    folder = tmp_path / "folder"
    folder.mkdir()
    missing = tmp_path / "nope.jpg"
    out = tmp_path / "o.safetensors"
    rc = predict_main([str(missing), str(text), str(folder), "--out", str(out), "--checkpoint", str(checkpoint)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "no usable face in the photos" in err
    assert f"{missing}: cannot read" in err and f"{text}: not an image" in err and f"{folder}: is a directory" in err
    # a usable photo among them: the adapter is written, and each skipped photo is named on stderr with its reason
    rc = predict_main([OBAMA[0], str(missing), "--out", str(out), "--checkpoint", str(checkpoint), "--steps", "2"])
    cap = capsys.readouterr()
    assert rc == 0 and out.is_file(), cap.err
    assert f"warning: skipped {missing}: cannot read" in cap.err and "left out: nope.jpg" in cap.out


def test_predict_warns_when_the_photos_show_different_people(checkpoint: Path, tmp_path: Path, capsys) -> None:
    bush = sorted(str(p) for p in (FACES / "lfw" / "George_W_Bush").glob("*.jpg"))[0]
    out = tmp_path / "o.safetensors"
    rc = predict_main([bush, str(FACES / "photos" / "obama.jpg"), "--out", str(out), "--checkpoint", str(checkpoint),
                       "--steps", "2"])  # fmt: skip
    cap = capsys.readouterr()
    assert rc == 0 and out.is_file(), cap.err
    assert "warning: the photos may not show one person" in cap.err and "no two of the 2 photos match" in cap.err
    rc = predict_main([*OBAMA, "--out", str(out), "--checkpoint", str(checkpoint), "--steps", "2"])
    assert rc == 0 and capsys.readouterr().err == ""  # one person: no warning


@pytest.fixture(scope="module")
def dora_checkpoint(tmp_path_factory) -> Path:
    from tests.utils.tiny_pipes import tiny_sd15_pipe

    out = tmp_path_factory.mktemp("dora") / "ckpt"
    Predictor.untrained(tiny_sd15_pipe(), BuildConfig(method="dora", targets=["to_q", "to_v"])).save(out)
    return out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--format", "kohya"], "whose conversion to kohya LoRA needs the base model's weights"),
        (["--rank", "2"], "whose conversion to diffusers LoRA of rank 2 needs the base model's weights"),
        (["--format", "peft", "--rank", "1"], "conversion to peft LoRA of rank 1"),
    ],
)
def test_predict_dora_conversion_says_what_works(dora_checkpoint: Path, tmp_path: Path, capsys, extra, message):
    # the photo does not exist: the format is refused before any photo is read
    argv = [str(tmp_path / "nope.jpg"), "--out", str(tmp_path / "o"), "--checkpoint", str(dora_checkpoint), *extra]
    rc = predict_main(argv)
    err = capsys.readouterr().err
    assert (
        rc == 2
        and message in err
        and "use --format diffusers or peft without --rank" in err
        and "--format native" in err
    )
    assert "base=..." not in err and err.count("\n") == 1


def test_predict_dora_without_conversion_works(dora_checkpoint: Path, tmp_path: Path, capsys) -> None:
    for fmt in ("diffusers", "native"):
        out = tmp_path / f"o.{fmt}.safetensors"
        argv = [OBAMA[0], "--out", str(out), "--checkpoint", str(dora_checkpoint), "--format", fmt, "--steps", "2"]
        assert predict_main(argv) == 0, capsys.readouterr().err
        assert load_any(out).spec.method == "dora"
