"""``difflora batch`` offline: identity folders × prompts → adapters + images, resumable, clear CLI errors."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from service.batch import main
from tests.service.conftest import ALEX, OBAMA
from tests.utils.faces import needs_faces


def _args(tiny_world, faces, prompts, out) -> list[str]:
    a = ["--faces", str(faces), "--prompts", str(prompts), "--out", str(out), "--steps", "2", "--size", "64",
         "--threads", "1", "--num-images", "2", "--model-path", tiny_world["model_path"]]  # fmt: skip
    return a + (["--untrained-hypernet"] if tiny_world["untrained_hypernet"] else [])


@needs_faces
def test_batch_offline(tiny_world, tmp_path, capsys):
    faces = tmp_path / "faces"
    for name, photos in (("obama", OBAMA[:3]), ("alex", ALEX[:2])):
        (faces / name).mkdir(parents=True)
        for p in photos:
            (faces / name / p.name).symlink_to(p)
    (faces / "blank").mkdir()
    Image.new("RGB", (64, 64), (90, 90, 90)).save(faces / "blank" / "x.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\na photo of sks person\n\na portrait of sks person\n")
    out = tmp_path / "out"
    assert main(_args(tiny_world, faces, prompts, out)) == 1  # "blank" has no face
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert {ln["identity"]: ln["ok"] for ln in lines} == {"alex": True, "blank": False, "obama": True}
    for name in ("obama", "alex"):
        files = sorted(f.name for f in (out / name).iterdir())
        assert files == ["000-0.png", "000-1.png", "001-0.png", "001-1.png", "adapter.safetensors", "identity.json",
                         "pytorch_lora_weights.safetensors"]  # fmt: skip
        assert Image.open(out / name / "000-1.png").size == (64, 64)
    err = capsys.readouterr().err
    assert "2 identities done, 1 failed: blank" in err
    assert "batch: 100%" in err and "6/6 [" in err  # the tqdm bar over identities x prompts
    # re-run: finished identities are skipped, the failed one is tried again (no bar with --no-progress)
    assert main([*_args(tiny_world, faces, prompts, out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "(2 done already)" in err and "2/2 [" not in err and "batch: " not in err.replace("difflora batch: ", "")


@needs_faces
def test_batch_on_ray(tiny_world, tmp_path, monkeypatch, capsys):
    pytest.importorskip("ray")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    faces = tmp_path / "faces"
    for name, photos in (("obama", OBAMA[:2]), ("alex", ALEX[:2])):
        (faces / name).mkdir(parents=True)
        for p in photos:
            (faces / name / p.name).symlink_to(p)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks person\n")
    out = tmp_path / "out"
    args = _args(tiny_world, faces, prompts, out) + [
        "--ray-address",
        "local",
        "--ray-workers",
        "2",
        "--num-images",
        "1",
    ]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["alex", "manifest.jsonl", "obama"]
    assert (out / "alex" / "000-0.png").is_file() and (out / "obama" / "identity.json").is_file()


def test_batch_bad_input(tmp_path, capsys):
    assert main(["--faces", str(tmp_path / "nope"), "--prompts", "p", "--out", str(tmp_path)]) == 2
    (tmp_path / "p.txt").write_text("\n")
    assert main(["--faces", str(tmp_path), "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "is not a folder" in err and "need at least one prompt" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--size", "100000"], "--size must be a multiple of 8 in 8..256 for the tiny preset, got 100000"),
        (["--size", "63"], "--size must be a multiple of 8"),
        (["--steps", "0"], "--steps: input should be greater than or equal to 1, got 0"),
        (["--guidance-scale", "nan"], "--guidance-scale must be a finite number, got nan"),
        (["--adapter-scale", "inf"], "--adapter-scale must be a finite number, got inf"),
        (["--num-images", "100000"], "--num-images: input should be less than or equal to 64, got 100000"),
        (["--max-photos", "0"], "--max-photos must be in [1, 100], got 0"),
        (["--seed", "-1"], "--seed: input should be greater than or equal to 0, got -1"),
        (["--guidance-scale", "31"], "--guidance-scale: input should be less than or equal to 30, got 31.0"),
        (["--seed", str(2**32)], "--seed: input should be less than or equal to 4294967295, got 4294967296"),
        (["--threads", "-1"], "--threads must be in [0, 256], got -1"),
        (["--ray-workers", "0"], "--ray-workers must be >= 1, got 0"),
        (["--device", "foo"], "--device: unknown device 'foo'"),
    ],
)
def test_batch_rejects_bad_options_before_loading_anything(tmp_path, capsys, extra, message):
    (tmp_path / "p.txt").write_text("a photo of sks person\n")
    argv = ["--faces", str(tmp_path), "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_batch_bad_prompts_file_and_output(tmp_path, capsys):
    faces = tmp_path / "faces" / "obama"
    faces.mkdir(parents=True)
    (faces / "a.jpg").write_bytes(b"x")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    (tmp_path / "p.txt").write_text("a\n")
    (tmp_path / "file").write_text("keep")
    assert (
        main(
            ["--faces", str(tmp_path / "faces"), "--prompts", str(tmp_path / "bin.txt"), "--out", str(tmp_path / "o")]
        )
        == 2
    )
    assert "is not UTF-8 text" in capsys.readouterr().err
    assert (
        main(
            ["--faces", str(tmp_path / "faces"), "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "file")]
        )
        == 2
    )
    assert "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "keep"


def test_batch_unreachable_ray_address_fails_at_once(tmp_path, capsys):
    pytest.importorskip("ray")
    faces = tmp_path / "faces" / "obama"
    faces.mkdir(parents=True)
    (faces / "a.jpg").write_bytes(b"x")
    (tmp_path / "p.txt").write_text("a\n")
    argv = ["--faces", str(tmp_path / "faces"), "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o")]
    assert main([*argv, "--ray-address", "127.0.0.1:1"]) == 2
    assert "cannot reach the Ray cluster at 127.0.0.1:1" in capsys.readouterr().err


def test_batch_cuda_on_a_ray_cluster_without_gpus_is_refused(tmp_path, monkeypatch, capsys):
    """--device cuda on Ray is checked against the cluster (not the driver): no GPU there is one clear line, not
    tasks waiting forever for a GPU."""
    pytest.importorskip("ray")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    (tmp_path / "faces" / "obama").mkdir(parents=True)
    (tmp_path / "faces" / "obama" / OBAMA[0].name).symlink_to(OBAMA[0])
    faces = tmp_path / "faces"
    (tmp_path / "p.txt").write_text("a photo\n")
    argv = ["--faces", str(faces), "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "out")]
    assert main([*argv, "--device", "cuda", "--ray-address", "local", "--ray-workers", "1"]) == 2
    assert "--device cuda: the Ray cluster has no GPU" in capsys.readouterr().err
