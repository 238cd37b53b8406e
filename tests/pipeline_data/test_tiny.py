"""The tiny face world: tokenizer, crops, latent fold, a resumable pretrain, and the committed base model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline_data.splits import split_of

REPO = Path(__file__).resolve().parents[2]
FACES = REPO.parent / "shared" / "data" / "faces"
TINY_BASE = Path(
    os.environ.get("DIFFLORA_TINY_BASE") or REPO / "assets" / "tiny" / "base"
)  # same override as the preset
needs_faces = pytest.mark.skipif(not FACES.is_dir(), reason="shared faces not present")


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


def test_cli_bad_input_returns_nonzero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline_data.tiny.cli import main

    assert main(["pretrain", "--faces", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "faces directory not found" in capsys.readouterr().err
    assert main(["export", "--work", str(tmp_path / "nowork"), "--out", str(tmp_path / "o")]) == 1
    assert main(["sample", "--model", str(tmp_path / "nomodel"), "--out", str(tmp_path / "s.png")]) == 1


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
