"""The adapter dataset build on the bundled tiny base: local, Ray, resume after a kill, bad folders, the check."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline_data.build import BuildConfig, build, discover, load_dataset_adapters, read_records
from tests.utils.datasets import DATASET_IDS, FACES, REPO, build_config
from tests.utils.faces import needs_faces
from weights.adapter import Adapter

IDS = DATASET_IDS
TIMING = ("seconds_prepare", "seconds_train")


def cfg(**kw) -> BuildConfig:
    return build_config(**kw)


def comparable(out: Path) -> dict:
    """Records without timings; adapters compared separately."""
    return {k: {f: v for f, v in r.items() if f not in TIMING} for k, r in read_records(out).items()}


def assert_same_dataset(a: Path, b: Path, atol: float = 1e-5) -> None:
    ra, rb = comparable(a), comparable(b)
    assert ra.keys() == rb.keys()
    for k in ra:
        la, lb = ra[k].pop("loss", None), rb[k].pop("loss", None)
        assert ra[k] == rb[k], k
        if la:
            assert la["steps"] == lb["steps"] and abs(la["last"] - lb["last"]) < 1e-3
    aa, ab = load_dataset_adapters(a), load_dataset_adapters(b)
    assert aa.keys() == ab.keys() and aa
    for k in aa:
        for t in aa[k].tensors:
            torch.testing.assert_close(aa[k].tensors[t], ab[k].tensors[t], atol=atol, rtol=1e-4)


@pytest.fixture(scope="module")
def local_build(tiny_dataset: Path) -> Path:
    return tiny_dataset


def test_local_build_writes_adapters_and_manifest(local_build: Path) -> None:
    lines = (local_build / "manifest.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert [r["identity"] for r in recs] == sorted(["lfw__Aaron_Peirsol", "lfw__Abdullah_Gul", "orl__s1"])
    for r in recs:
        assert r["status"] == "ok" and r["split"] in ("train", "val", "eval")
        n_photos = len(list(Path(r["source"]).iterdir()))
        assert len(r["heldout"]) == (2 if n_photos >= 8 else 1)  # two held out where the folder has 8 or more
        assert not set(r["heldout"]) & set(r["photos_used"])
        assert len(r["embeddings"]) == len(r["photos_used"]) and len(r["identity_embedding"]) == 128
        assert r["loss"]["steps"] == 12 and np.isfinite(r["loss"]["last"])
        assert (local_build / r["adapter"]).is_file()
    ad = load_dataset_adapters(local_build)
    specs = {a.spec.hash() for a in ad.values()}
    assert len(specs) == 1, "every identity must share one weight space (same spec)"
    a: Adapter = next(iter(ad.values()))
    assert a.spec.method == "lora" and any(".conv1" in lay.name for lay in a.spec.layers)
    assert max(float(t.abs().max()) for k, t in a.tensors.items() if k.endswith("::B")) > 0  # it trained


def test_rerun_skips_finished_identities(local_build: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in (local_build / "adapters").iterdir()}
    summary = build([str(p) for p in IDS], local_build, cfg(), progress=False)
    assert summary["ok"] == 3
    after = {p.name: p.stat().st_mtime_ns for p in (local_build / "adapters").iterdir()}
    assert before == after


def test_other_recipe_refuses_to_mix(local_build: Path) -> None:
    with pytest.raises(ValueError, match="another recipe"):
        build([str(p) for p in IDS], local_build, cfg(rank=8), progress=False)


def test_ray_build_equals_local(local_build: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = build([str(p) for p in IDS], tmp_path / "ray", cfg(), ray_address="local", progress=False)
    finally:
        ray.shutdown()
    assert summary["ok"] == 3 and not summary["failed"]
    assert_same_dataset(local_build, tmp_path / "ray")


def test_killed_build_resumes_to_same_result(local_build: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    c = cfg()
    argv = [sys.executable, "-m", "service.cli", "data", "build", "--faces", *map(str, IDS), "--out", str(out),
            "--base", c.base, "--steps", str(c.steps), "--batch-size", str(c.batch_size), "--threads", "1",
            "--check-identities", "0"]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list((out / "records").glob("*.json")):
            time.sleep(0.2)
        assert list((out / "records").glob("*.json")), "the build never finished an identity"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    assert len(read_records(out)) < 3
    leftovers = [p for p in out.rglob("*") if p.is_file() and (".tmp" in p.name or p.name.startswith("."))]
    assert not leftovers, leftovers
    summary = build([str(p) for p in IDS], out, c, progress=False)
    assert summary["ok"] == 3
    assert_same_dataset(local_build, out)


@needs_faces
def test_bad_folders_are_reported_not_fatal(tmp_path: Path) -> None:
    from PIL import Image

    noface = tmp_path / "bad" / "noface"
    noface.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(noface / f"{i}.png")
    (noface / "text.jpg").write_bytes(b"this is not an image")
    one = tmp_path / "bad" / "onephoto"
    one.mkdir()
    shutil.copy(FACES / "photos" / "obama.jpg", one / "a.jpg")
    mixed = tmp_path / "bad" / "mixed"
    mixed.mkdir()
    for i, name in enumerate(["obama.jpg", "obama2.jpg", "alex-lacamoire.png", "alex_lacamoire1.jpg"]):
        src = FACES / "photos" / name
        if src.exists():
            shutil.copy(src, mixed / f"{i}{src.suffix}")
    assert len(discover([tmp_path / "bad"])) == 3
    summary = build([tmp_path / "bad"], tmp_path / "out", cfg(), progress=False)
    assert summary["ok"] == 0 and not summary["failed"], summary
    reasons = summary["skipped"]
    assert "usable photos" in reasons["bad__noface"]
    assert "min_photos" in reasons["bad__onephoto"]
    assert "usable photos" in reasons["bad__mixed"]
    rec = read_records(tmp_path / "out")["bad__noface"]
    assert any("text.jpg" == r["photo"] for r in rec["rejected"])


@needs_faces
def test_photo_without_face_mid_folder_keeps_crops_aligned(tmp_path: Path) -> None:
    """A photo that decodes but has no face, followed by usable ones: every crop comes from its own photo."""
    from pipeline_data.build import IdentitySource, prepare_identity
    from pipeline_data.faces import get_encoder
    from pipeline_data.tiny.crops import aligned_crop

    src_dir = FACES / "lfw" / "Jacques_Chirac"  # _0006 has no detectable face (dlib)
    names = ["Jacques_Chirac_0001.jpg", "Jacques_Chirac_0002.jpg", "Jacques_Chirac_0006.jpg",
             "Jacques_Chirac_0007.jpg", "Jacques_Chirac_0008.jpg"]  # fmt: skip
    d = tmp_path / "Jacques_Chirac"
    d.mkdir()
    for n in names:
        (d / n).symlink_to(src_dir / n)  # links, not copies: the photos stay in ../shared
    enc = get_encoder("dlib")
    cfg = build_config(min_photos=4)
    rec = prepare_identity(IdentitySource("lfw", d.name, str(d)), cfg, enc, 64)
    assert rec["status"] == "ok", rec.get("reason")
    assert [r["photo"] for r in rec["rejected"]] == ["Jacques_Chirac_0006.jpg"]
    used = rec["photos_used"]
    for name, crop in zip(used, rec["_crops"]):
        rgb = enc.load_rgb(str(d / name))
        expected = aligned_crop(enc, rgb, enc.embed(rgb).face, 64, cfg.crop_padding)
        assert np.array_equal(crop, expected), name


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["{build}", "--lr", "nan"], "argument --lr: must be a finite number, got nan"),
        (["{build}", "--lr", "0"], "argument --lr: must be > 0, got 0"),
        (["{build}", "--alpha", "nan"], "argument --alpha: must be a finite number"),
        (["{build}", "--alpha", "inf"], "argument --alpha: must be a finite number"),
        (["{build}", "--method-params", "[1]"], "--method-params must be a JSON object, got [1]"),
        (["{build}", "--method-params", "{x"], "--method-params is not JSON"),
        (["{build}", "--method-params", '{"foo": 1}'], "--method-params: lora does not accept foo (accepted: init)"),
        (["{build}", "--method-params", '{"init": "bad"}'], "--method-params: unknown LoRA init 'bad'"),
        (["{build}", "--method", "hta", "--method-params", '{"svd": "exact"}'], "hta does not accept svd"),
        (["{build}", "--method", "snell", "--method-params", '{"sparsity": 2}'], "sparsity must be in [0, 1)"),
        (["{build}", "--targets", "nosuchmodule"], "--targets: no module of the model matches"),
        (["{build}", "--method", "arc"], "--method arc cannot adapt target"),  # full targets: 3x3 convs
        (["{build}", "--base", "nosuch"], "--base 'nosuch' is neither a preset"),
        (["{build}", "--base", "{tmp}"], "no diffusers model_index.json"),
        (["{build}", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
        (["{build}", "--rank", "-1"], "argument --rank: must be >= 1, got -1"),
        (["{build}", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
        (["{build}", "--threads", "-1"], "argument --threads: must be >= 0, got -1"),
        (["{build}", "--prior-weight", "nan"], "argument --prior-weight: must be a finite number"),
        (["{build}", "--min-photos", "1"], "min_photos must be >= 2"),
        (["{build}", "--max-photos", "3"], "max_photos (3) must be >= min_photos (4)"),
        (["{build}", "--limit", "-1"], "argument --limit: must be >= 1, got -1"),
        (["{build}", "--limit", "0"], "argument --limit: must be >= 1, got 0"),
        # the Ray address is checked after the faces folders are found
        pytest.param(
            ["{build}", "--ray-address", "127.0.0.1:1"],
            "cannot reach the Ray cluster at 127.0.0.1:1",
            marks=needs_faces,
        ),
        pytest.param(
            ["{build}", "--ray-address", "nowhere"],
            "--ray-address 'nowhere': expected local, auto or HOST:PORT",
            marks=needs_faces,
        ),
        (["build", "--faces", "{tmp}", "--out", "{out}"], "no identity folders with photos found in"),
        (["build", "--faces", "{tmp}/missing", "--out", "{out}"], "faces directory not found"),
        (["check", "{tmp}", "--seeds", "-2"], "argument --seeds: must be >= 1, got -2"),
        (["check", "{tmp}", "--seeds", "0"], "argument --seeds: must be >= 1, got 0"),
        (["check", "{tmp}", "--limit", "-1"], "argument --limit: must be >= 1, got -1"),
        (["check", "{tmp}"], "is not a dataset directory"),
    ],
)
def test_cli_bad_input_one_clear_error_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    """Bad flags, recipes and inputs: exit 2, one line naming the problem, within seconds, nothing written."""
    from pipeline_data.cli import main
    from tests.utils.datasets import tiny_base

    out = tmp_path / "out"
    build_argv = ["build", "--faces", str(IDS[0]), "--out", str(out), "--base", tiny_base(), "--threads", "1"]
    subst = {"{build}": build_argv, "{out}": [str(out)], "{tmp}": [str(tmp_path)]}
    args = [x.replace("{tmp}", str(tmp_path)) for a in argv for x in subst.get(a, [a])]
    t0 = time.perf_counter()
    assert main(args) == 2
    assert time.perf_counter() - t0 < 30
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("difflora data") and needle in lines[0], lines[0]
    assert not out.exists()


def test_records_name_their_photos_from_any_directory(
    local_build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline_data.build import record_source

    recs = read_records(local_build)
    assert recs and all(Path(r["source"]).is_absolute() for r in recs.values())  # new records: absolute paths
    rec = next(iter(recs.values()))
    assert record_source(rec, local_build) == Path(rec["source"])
    # an older record: the path relative to the build's working directory (repo/), the dataset in repo/data/ds
    (tmp_path / "shared" / "faces").mkdir(parents=True)
    (tmp_path / "shared" / "faces" / IDS[0].name).symlink_to(IDS[0])
    ds = tmp_path / "repo" / "data" / "ds"
    ds.mkdir(parents=True)
    old = {"source": f"../shared/faces/{IDS[0].name}"}
    want = tmp_path / "shared" / "faces" / IDS[0].name
    for cwd in (tmp_path / "repo", tmp_path / "repo" / "data", tmp_path / "x" / "y"):
        cwd.mkdir(parents=True, exist_ok=True)
        monkeypatch.chdir(cwd)
        assert record_source(old, ds) == want, cwd
        assert record_source(old, os.path.relpath(ds, cwd)) == want, cwd
    assert record_source({"source": "../nowhere/x"}, ds) == tmp_path / "x" / "nowhere" / "x"  # cwd-relative


def test_shipped_dataset_records_resolve_outside_the_repository(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data/tiny-lora (read, never rewritten) stores paths relative to the repository root."""
    from pipeline_data.build import record_source

    ds = REPO / "data" / "tiny-lora"
    if not (ds / "records").is_dir() or not FACES.is_dir():
        pytest.skip("data/tiny-lora (built by make tiny-assets) or the face photos not present")
    rec = next(r for r in read_records(ds).values() if r["status"] == "ok")
    monkeypatch.chdir(tmp_path)
    src = record_source(rec, ds)
    assert src.is_dir() and all((src / name).is_file() for name in rec["photos_used"] + rec["heldout"]), src


def test_the_shipped_recipe_replays_with_overrides(tmp_path: Path) -> None:
    """``data build --recipe assets/tiny/hypernet/dataset_recipe.json``: every recipe value lands in the build's
    config (its --class-prompt / --crop-padding / --prior-images too), flags given on the command line win."""
    from pipeline_data.cli import main
    from tests.utils.datasets import tiny_base

    recipe = REPO / "assets" / "tiny" / "hypernet" / "dataset_recipe.json"
    flags = json.loads(recipe.read_text())
    assert {"--class-prompt", "--crop-padding", "--prior-images"} <= set(flags)
    out = tmp_path / "replay"
    argv = ["build", "--recipe", str(recipe), "--faces", str(IDS[0]), "--out", str(out), "--base", tiny_base(),
            "--steps", "2", "--batch-size", "2", "--threads", "1", "--check-identities", "0"]  # fmt: skip
    assert main(argv) == 0
    got = BuildConfig.from_dict(json.loads((out / "config.json").read_text()))
    assert got.recipe_flags() == {**flags, "--steps": 2, "--batch-size": 2}
    (rec,) = read_records(out).values()
    assert rec["status"] == "ok" and rec["loss"]["steps"] == 2
    # the three flags the recipe names are data build options too
    out2 = tmp_path / "flags"
    argv2 = ["build", "--faces", str(IDS[0]), "--out", str(out2), "--base", tiny_base(), "--steps", "1",
             "--class-prompt", "a photo of a man", "--crop-padding", "0.25", "--prior-images", "3",
             "--check-identities", "0", "--threads", "1"]  # fmt: skip
    assert main(argv2) == 0
    got2 = json.loads((out2 / "config.json").read_text())
    assert (got2["class_prompt"], got2["crop_padding"], got2["prior_images"]) == ("a photo of a man", 0.25, 3)


@pytest.mark.parametrize("no_progress", [False, True])
def test_data_check_shows_a_progress_bar(tiny_dataset: Path, tmp_path: Path, capsys, no_progress: bool) -> None:
    import shutil

    from pipeline_data.cli import main

    ds = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds)  # the check writes its figures into the records: not into the shared one
    argv = ["check", str(ds), "--seeds", "1"] + (["--no-progress"] if no_progress else [])
    assert main(argv) == 0
    cap = capsys.readouterr()
    assert "identity check on 3 identities" in cap.out
    assert ("identity check: 100%" in cap.err and "4/4 [" in cap.err) != no_progress  # base model + 3 adapters
