"""The tiny face world: tokenizer, crops, latent fold, a resumable pretrain, and the committed base model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline_data.splits import split_of
from tests.utils.faces import FACES, needs_faces

REPO = Path(__file__).resolve().parents[2]
TINY_BASE = Path(
    os.environ.get("DIFFLORA_TINY_BASE") or REPO / "assets" / "tiny" / "base"
)  # same override as the preset


# ------------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_files_load_in_clip_tokenizer(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    from pipeline_data.tiny.tokenizer import write_tokenizer

    d = write_tokenizer(tmp_path / "tok")
    assert (d / "vocab.json").is_file() and (d / "merges.txt").is_file()
    tok = CLIPTokenizer.from_pretrained(str(d), local_files_only=True)
    assert tok.model_max_length == 77
    text = "a photo of a person smiling, portrait, sks, man, woman"
    toks = tok.convert_ids_to_tokens(tok(text).input_ids)
    assert toks[0] == "<|startoftext|>" and toks[-1] == "<|endoftext|>"
    for w in ("photo</w>", "person</w>", "smiling</w>", "portrait</w>", "sks</w>", "woman</w>"):
        assert w in toks  # ordinary prompt words are single tokens
    odd = "Zyxwv über 日本"  # byte fallback: anything tokenises and decodes back
    assert tok.decode(tok(odd).input_ids, skip_special_tokens=True) == odd.lower()
    ids = tok(["a photo", ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.shape == (2, 77)


# ---------------------------------------------------------------------------------------------------- arch


def test_fold_latent_normalisation_is_exact() -> None:
    from pipeline_data.tiny.arch import VAEConfig, build_vae, fold_latent_normalisation

    torch.manual_seed(0)
    vae = build_vae(VAEConfig()).eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    m, s = torch.tensor([0.5, -1.0, 2.0, 0.1]), torch.tensor([2.0, 0.5, 3.0, 1.5])
    with torch.no_grad():
        before = vae.encode(x).latent_dist
        z = torch.randn(2, 4, 16, 16)
        dec_before = vae.decode(z * s[None, :, None, None] + m[None, :, None, None]).sample
        fold_latent_normalisation(vae, m, s)
        after = vae.encode(x).latent_dist
        dec_after = vae.decode(z).sample
    torch.testing.assert_close(after.mean, (before.mean - m[None, :, None, None]) / s[None, :, None, None])
    torch.testing.assert_close(after.std, before.std / s[None, :, None, None])
    torch.testing.assert_close(dec_after, dec_before, atol=1e-5, rtol=1e-4)
    assert vae.config.scaling_factor == 1.0


# --------------------------------------------------------------------------------------------------- crops


@needs_faces
@pytest.mark.parametrize("rel, grey", [("lfw/Aaron_Peirsol/Aaron_Peirsol_0001.jpg", False), ("orl/s1/1.pgm", True)])
def test_crop_photo_real_faces(rel: str, grey: bool) -> None:
    from pipeline_data.tiny.crops import CROP_SIZE, crop_photo

    res = crop_photo(FACES / rel)
    assert res is not None
    crop, is_grey = res
    assert crop.shape == (CROP_SIZE, CROP_SIZE, 3) and crop.dtype == np.uint8 and is_grey is grey


@needs_faces
def test_tiny_crop_through_faces_api_matches_training_crops() -> None:
    from pipeline_data.images import decode_image
    from pipeline_data.tiny.crops import crop_photo, tiny_crop

    path = FACES / "lfw" / "Aaron_Peirsol" / "Aaron_Peirsol_0001.jpg"
    np.testing.assert_array_equal(tiny_crop(decode_image(path)), crop_photo(path)[0])


# ------------------------------------------------------------------------------------------------ pretrain


def _small_faces(root: Path) -> Path:
    """A faces root of symlinks to a few non-eval identities (photos are never copied)."""
    picked = 0
    for ds, want in (("lfw", 3), ("orl", 1)):
        (root / ds).mkdir(parents=True)
        for ident in sorted(p for p in (FACES / ds).iterdir() if p.is_dir()):
            if split_of(ds, ident.name) == "train" and want:
                (root / ds / ident.name).symlink_to(ident)
                want -= 1
                picked += 1
    assert picked == 4
    return root


def _small_cfg(unet_steps: int):
    from pipeline_data.tiny.arch import TextConfig, TinyConfig, UNetConfig, VAEConfig

    return TinyConfig(
        vae=VAEConfig(steps=3, batch_size=4),
        text=TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        unet=UNetConfig(block_out_channels=(32, 32, 32), steps=unet_steps, batch_size=4, warmup=2),
        threads=1,
        checkpoint_every_s=0.0,
        max_photos=12,
    )


@needs_faces
def test_pretrain_smoke_resume_and_stock_diffusers_load(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from pipeline_data.tiny.pretrain import pretrain

    faces = _small_faces(tmp_path / "faces")
    cache = tmp_path / "cache"
    # straight through: 6 UNet steps
    out_a = pretrain(faces, tmp_path / "a", tmp_path / "wa", _small_cfg(6), cache_dir=cache, progress=False)
    # interrupted after 3 steps, then resumed to 6
    assert (
        pretrain(
            faces, tmp_path / "b", tmp_path / "wb", _small_cfg(6), cache_dir=cache, progress=False, stop_at_step=3
        )
        is None
    )
    assert not (tmp_path / "b").exists()
    out_b = pretrain(
        faces, tmp_path / "b", tmp_path / "wb", _small_cfg(6), resume=True, cache_dir=cache, progress=False
    )
    stages = [json.loads(line)["stage"] for line in (tmp_path / "wb" / "metrics.jsonl").read_text().splitlines()]
    assert stages.count("vae_done") == 1 and "unet_stopped" in stages and stages[-1] == "unet_done"
    fa = load_file(str(out_a / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(v.dtype == torch.float16 for v in fa.values())  # UNet exported as fp16
    ca = load_file(str(tmp_path / "wa" / "unet_ckpt.safetensors"))
    cb = load_file(str(tmp_path / "wb" / "unet_ckpt.safetensors"))
    assert ca.keys() == cb.keys()
    steps = {k: (ca[k].item(), cb[k].item()) for k in ca if k.endswith(".step")}
    assert steps and all(x == (6.0, 6.0) for x in steps.values())  # AdamW state came back from the checkpoint
    assert torch.equal(ca["rng"], cb["rng"])  # the batch/noise generator continued where it stopped
    # Resuming reproduces the uninterrupted run up to CPU kernel noise: Adam's first steps move weights with
    # near-zero gradients by +-lr (~3e-4 here), so the weights agree to a few lr; a lost optimizer/RNG/EMA state
    # would differ far more.
    for k in ca:
        if not k.startswith("opt."):
            torch.testing.assert_close(ca[k], cb[k], atol=2e-3, rtol=0)
    assert json.loads((out_b / "training.json").read_text())["unet_steps"] == 6
    pipe = StableDiffusionPipeline.from_pretrained(str(out_b), local_files_only=True)
    assert pipe.tokenizer.model_max_length == 77 and (out_b / "tokenizer" / "merges.txt").is_file()
    img = pipe("a photo of a person", num_inference_steps=2, output_type="np").images
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()
    # an earlier export may be replaced (atomically, no leftovers next to it); a work folder is cleared of
    # what pretrain wrote and nothing else
    from pipeline_data.tiny.cli import main
    from pipeline_data.tiny.folders import prepare_work_dir

    assert main(["export", "--work", str(tmp_path / "wb"), "--out", str(out_a)]) == 0
    assert json.loads((out_a / "training.json").read_text())["unet_steps"] == 6
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    (tmp_path / "wa" / "notes.txt").write_text("mine")
    prepare_work_dir(tmp_path / "wa", resume=False)
    assert [p.name for p in (tmp_path / "wa").iterdir()] == ["notes.txt"]


@needs_faces
def test_v2_shape_pretrain_exports_128px_through_an_8x_vae(tmp_path: Path) -> None:
    """The v2 preset's shape (128x128 crops, 8x VAE, 8 latent channels, lfw_few included) at toy sizes."""
    from dataclasses import replace

    from diffusers import StableDiffusionPipeline

    from pipeline_data.tiny.arch import tiny_preset
    from pipeline_data.tiny.pretrain import pretrain

    v2 = tiny_preset("v2")
    assert v2.crop_size == 128 and "lfw_few" in v2.datasets and len(v2.vae.block_out_channels) == 4
    small = _small_cfg(2)
    cfg = replace(
        small,
        crop_size=v2.crop_size,
        datasets=v2.datasets,
        vae=replace(small.vae, block_out_channels=(8, 8, 16, 16), latent_channels=v2.vae.latent_channels),
    )
    faces = _small_faces(tmp_path / "faces")
    out = pretrain(faces, tmp_path / "o", tmp_path / "w", cfg, cache_dir=tmp_path / "c", progress=False)
    pipe = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    assert pipe.unet.config.sample_size == 16 and pipe.unet.config.in_channels == 8 and pipe.vae_scale_factor == 8
    img = pipe("a photo of a person", num_inference_steps=2, output_type="np").images
    assert img.shape == (1, 128, 128, 3) and np.isfinite(img).all()
    card = (out / "README.md").read_text()
    assert "128x128 px, 16x16x8 latents" in card and "8x down" in card
    with pytest.raises(ValueError, match="crop_size"):  # a work folder of another resolution is not resumed
        pretrain(faces, tmp_path / "o", tmp_path / "w", _small_cfg(2), resume=True, cache_dir=tmp_path / "c")


def test_cli_bad_input_returns_nonzero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline_data.tiny.cli import main

    assert main(["pretrain", "--faces", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "faces directory not found" in capsys.readouterr().err
    assert main(["export", "--work", str(tmp_path / "nowork"), "--out", str(tmp_path / "o")]) == 1
    assert main(["sample", "--model", str(tmp_path / "nomodel"), "--out", str(tmp_path / "s.png")]) == 1


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["sample", "--out", "{png}", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
        (["sample", "--out", "{png}", "--steps", "-3"], "argument --steps: must be >= 1, got -3"),
        (["sample", "--out", "{png}", "--steps", "2.5"], "argument --steps: expected an integer"),
        (["sample", "--out", "{png}", "--guidance", "nan"], "argument --guidance: must be a finite number"),
        (["sample", "--out", "{png}", "--guidance", "inf"], "argument --guidance: must be a finite number"),
        (["sample", "--out", "{dir}"], "is a folder"),
        (["pretrain", "{pre}", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
        (["pretrain", "{pre}", "--threads", "-1"], "argument --threads: must be >= 1, got -1"),
        (["pretrain", "{pre}", "--vae-steps", "-5", "--unet-steps", "-1"], "argument --vae-steps: must be >= 1"),
        (["pretrain", "{pre}", "--unet-steps", "0"], "argument --unet-steps: must be >= 1, got 0"),
        (["pretrain", "{pre}", "--max-photos", "0"], "argument --max-photos: must be >= 1, got 0"),
        (["pretrain", "{pre}", "--checkpoint-every", "-1"], "argument --checkpoint-every: must be >= 0"),
        (["pretrain", "{pre}", "--checkpoint-every", "nan"], "argument --checkpoint-every: must be a finite"),
    ],
)
def test_cli_bad_numbers_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    from pipeline_data.tiny.cli import main

    (tmp_path / "faces").mkdir()
    pre = ["--faces", str(tmp_path / "faces"), "--out", str(tmp_path / "o"), "--work", str(tmp_path / "w")]
    subst = {"{png}": [str(tmp_path / "g.png")], "{dir}": [str(tmp_path)], "{pre}": pre}
    assert main([x for a in argv for x in subst.get(a, [a])]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("difflora tiny") and needle in line, line
    assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists() and not (tmp_path / "g.png").exists()


def _pretrain_work(d: Path) -> Path:
    """A work folder as pretrain leaves it (its config.json and the other entries it writes)."""
    from dataclasses import asdict

    from pipeline_data.tiny.arch import TinyConfig

    (d / "tokenizer").mkdir(parents=True)
    (d / "tokenizer" / "vocab.json").write_text("{}")
    (d / "vae").mkdir()
    (d / "config.json").write_text(json.dumps(asdict(TinyConfig())))
    for name in ("metrics.jsonl", "vae_ckpt.safetensors", "latents.safetensors", "unet_ckpt.safetensors.tmp"):
        (d / name).write_text("x")
    return d


@pytest.mark.parametrize(
    "case, needle",
    [
        ("work_foreign", "--work {w} is not empty and is not a tiny pretrain work folder"),
        ("work_file", "--work {w} exists and is not a folder"),
        ("work_foreign_resume", "--work {w} is not empty and is not a tiny pretrain work folder"),
        ("out_foreign", "--out {o} is not empty and is not a model folder written by difflora tiny"),
        ("out_other_model", "--out {o} is not empty and is not a model folder written by difflora tiny"),
        ("out_file", "--out {o} exists and is not a folder"),
        ("export_out_foreign", "--out {o} is not empty and is not a model folder written by difflora tiny"),
    ],
)
def test_cli_refuses_folders_it_did_not_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, needle: str
) -> None:
    """``--work`` / ``--out`` holding anything pretrain/export did not write: exit 2 and every file kept."""
    from pipeline_data.tiny.cli import main

    faces, work, out = tmp_path / "faces", tmp_path / "w", tmp_path / "o"
    faces.mkdir()
    if case.startswith("work_"):
        if case == "work_file":
            work.write_text("k")
        else:
            work.mkdir()
            (work / "s.txt").write_text("k")
    if case.startswith(("out_", "export_")):
        if case == "out_file":
            out.write_text("k")
        else:
            (out / "hypernet").mkdir(parents=True)
            (out / "hypernet" / "model.safetensors").write_text("k")
            if case == "out_other_model":
                (out / "model_index.json").write_text("{}")
    before = sorted((p.relative_to(tmp_path), p.is_file() and p.read_text()) for p in tmp_path.rglob("*"))
    if case == "export_out_foreign":
        argv = ["export", "--work", str(_pretrain_work(work)), "--out", str(out)]
        before = sorted((p.relative_to(tmp_path), p.is_file() and p.read_text()) for p in tmp_path.rglob("*"))
    else:
        argv = ["pretrain", "--faces", str(faces), "--out", str(out), "--work", str(work), "--cache", str(tmp_path)]
        argv += ["--resume"] if case.endswith("_resume") else []
    assert main(argv) == 2
    line = _one_line(capsys.readouterr().err)
    assert needle.format(w=work, o=out) in line, line
    after = sorted((p.relative_to(tmp_path), p.is_file() and p.read_text()) for p in tmp_path.rglob("*"))
    assert after == before  # nothing removed, nothing written


def test_work_folder_clears_only_what_pretrain_wrote(tmp_path: Path) -> None:
    from pipeline_data.tiny.folders import WORK_ENTRIES, prepare_work_dir

    work = _pretrain_work(tmp_path / "w")
    (work / "notes.txt").write_text("mine")
    (work / "mine").mkdir()
    (work / "mine" / "data.bin").write_text("mine")
    entries = sorted(p.name for p in work.iterdir())
    assert prepare_work_dir(work, resume=True) == work and sorted(p.name for p in work.iterdir()) == entries
    prepare_work_dir(work, resume=False)
    assert sorted(p.name for p in work.iterdir()) == ["mine", "notes.txt"]
    assert (work / "mine" / "data.bin").read_text() == "mine"
    assert set(entries) - {"mine", "notes.txt"} <= set(WORK_ENTRIES)
    assert prepare_work_dir(tmp_path / "new" / "w", resume=False).is_dir()  # absent: created
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_work_dir(empty, resume=False)
    assert empty.is_dir()


def test_out_folder_accepts_absent_empty_or_an_earlier_export(tmp_path: Path) -> None:
    from pipeline_data.tiny.folders import FolderRefusedError, check_out_dir

    assert check_out_dir(tmp_path / "absent") == tmp_path / "absent"
    (tmp_path / "empty").mkdir()
    check_out_dir(tmp_path / "empty")
    check_out_dir(TINY_BASE)  # the committed base is an export: re-exporting there is allowed (only read here)
    with pytest.raises(FolderRefusedError, match="not a model folder written by difflora tiny"):
        check_out_dir(TINY_BASE.parent)  # assets/tiny: the base and everything next to it


def test_cli_help_and_sample_default_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--threads`` help states the code default; ``sample`` finds the bundled base from any directory."""
    from pipeline_data.tiny.arch import TinyConfig
    from pipeline_data.tiny.cli import main

    assert main(["pretrain", "--help"]) == 0
    assert f"torch threads (default {TinyConfig().threads})" in " ".join(capsys.readouterr().out.split())
    monkeypatch.chdir(tmp_path)  # outside the repository
    if "DIFFLORA_TINY_BASE" not in os.environ:
        assert main(["sample", "--out", "g.png", "--steps", "1"]) == 0, capsys.readouterr().err
        from PIL import Image

        assert Image.open(tmp_path / "g.png").size == (4 * 64 * 2, 4 * 64 * 2)


# ------------------------------------------------------------------------------------- the committed model


@pytest.fixture(scope="module")
def tiny_images() -> np.ndarray:
    from diffusers import StableDiffusionPipeline

    assert (TINY_BASE / "model_index.json").is_file(), f"bundled tiny base missing: {TINY_BASE} (make tiny-assets)"
    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(str(TINY_BASE), local_files_only=True)  # no dtype: plain stock load
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(i) for i in range(8)]
    out = pipe(
        ["a photo of a person"] * 8, num_inference_steps=20, guidance_scale=3.0, generator=gens, output_type="np"
    ).images  # (8, 64, 64, 3) in [0, 1]
    return (out * 255).round().astype(np.uint8)


def test_committed_tiny_base_loads_and_makes_64px_images(tiny_images: np.ndarray) -> None:
    assert tiny_images.shape == (8, 64, 64, 3)
    assert tiny_images.std() > 20  # not blank


def _centred_faces(enc, images: np.ndarray, side: int = 192) -> int:
    """How many images have a dlib-detected face whose box centre lies in the middle third (aligned crops)."""
    from PIL import Image

    n = 0
    for im in images:
        big = np.asarray(Image.fromarray(im).resize((side, side), Image.Resampling.BICUBIC))
        faces = enc.detect(big)
        if faces:
            f = max(faces, key=lambda f: f.area)
            cx, cy = (f.box[0] + f.box[2]) / 2, (f.box[1] + f.box[3]) / 2
            n += int(side / 3 < cx < 2 * side / 3 and side / 3 < cy < 2 * side / 3)
    return n


def test_committed_tiny_base_generates_faces(tiny_images: np.ndarray) -> None:
    """dlib's HOG detector finds a centred face in most samples, and in none of a blocky-noise control."""
    from pipeline_data.faces import get_encoder

    enc = get_encoder("dlib")
    found = _centred_faces(enc, tiny_images)
    rng = np.random.default_rng(0)
    noise = (rng.random((8, 8, 8, 3)) * 255).astype(np.uint8).repeat(8, 1).repeat(8, 2)  # (8, 64, 64, 3)
    assert _centred_faces(enc, noise) == 0
    assert found >= 5, f"only {found}/8 samples of the tiny base contain a detectable centred face"
