"""The diffusers-facing API (hypernet.personalizer) on stock pipelines: the bundled tiny SD 1.5 model with its
trained hypernet and real photos, and a tiny SDXL pipeline built from config with an adapter file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from hypernet import Personalization, Personalizer, personalize
from pipeline_data.models import TINY_BASE
from service.settings import TINY_HYPERNET
from tests.service.conftest import one_torch_thread  # noqa: F401 - one torch thread for this module
from tests.utils.adapters import make_adapter
from tests.utils.tiny_pipes import run_pipe, tiny_sdxl_pipe

REPO = Path(__file__).resolve().parents[2]
FACES = Path(os.environ.get("DIFFLORA_FACES", REPO.parent / "shared" / "data" / "faces"))
OBAMA = sorted((FACES / "photos").glob("obama*.jpg"))[:3]
needs_tiny = pytest.mark.skipif(
    not (TINY_BASE / "model_index.json").is_file() or not (TINY_HYPERNET / "config.json").is_file() or not OBAMA,
    reason="needs the bundled tiny model + hypernet and the shared photos",
)


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def sd15():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(TINY_BASE), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@needs_tiny
def test_photos_personalize_a_stock_sd15_pipeline_and_undo_is_exact(sd15, tmp_path) -> None:
    before = _weights(sd15)
    base = run_pipe(sd15, seed=3, steps=3, size=64)
    with personalize(sd15, [str(p) for p in OBAMA], hypernet=TINY_HYPERNET, scale=1.0) as me:
        assert isinstance(me, Personalization) and me.active
        assert me.trigger == "sks person" and me.prompt == "a photo of sks person"
        assert len(me.identity["inliers"]) >= 2
        personal = run_pipe(sd15, seed=3, steps=3, size=64)
        assert np.abs(personal - base).mean() > 1e-3  # the predicted adapter changes the images
        me.set_scale(0.0)
        assert _same(_weights(sd15), before)  # scale 0 is the base model, exactly
        assert np.array_equal(run_pipe(sd15, seed=3, steps=3, size=64), base)
        me.set_scale(0.5)
        half = run_pipe(sd15, seed=3, steps=3, size=64)
        assert 0 < np.abs(half - base).mean() < np.abs(personal - base).mean() * 1.5
        me.set_scale(1.0)
        assert np.allclose(run_pipe(sd15, seed=3, steps=3, size=64), personal, atol=1e-5)
        me.save(tmp_path / "me.safetensors", "kohya", title="obama")
    assert not me.active
    assert _same(_weights(sd15), before)  # leaving the block restores every weight bit for bit
    assert np.array_equal(run_pipe(sd15, seed=3, steps=3, size=64), base)
    # the exported file carries the trigger phrase, and personalizes the same pipeline like the prediction did
    with personalize(sd15, adapter=tmp_path / "me.safetensors") as again:
        assert again.trigger == "sks person"
        assert np.allclose(run_pipe(sd15, seed=3, steps=3, size=64), personal, atol=1e-4)
    assert _same(_weights(sd15), before)


@needs_tiny
def test_personalizer_loads_once_for_many_people(sd15) -> None:
    pz = Personalizer.from_pretrained(TINY_HYPERNET)
    assert pz.trigger == "sks person"
    a, ident = pz.predict([str(p) for p in OBAMA])
    b, _ = pz.predict([str(p) for p in OBAMA])
    assert ident["inliers"] and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)  # deterministic
    before = _weights(sd15)
    first = pz.personalize(sd15, [str(p) for p in OBAMA[:2]])
    second = personalize(sd15, adapter=a)  # replaces the first one
    assert second.active and not first.active
    with pytest.raises(RuntimeError, match="another adapter replaced"):
        first.set_scale(0.5)
    first.remove()  # a stale handle leaves the newer adapter alone
    assert second.active
    with pytest.raises(RuntimeError, match="was removed"):
        first.set_scale(0.5)
    second.remove()
    assert _same(_weights(sd15), before)


def test_sdxl_pipeline_takes_an_adapter_file_and_undoes_exactly(tmp_path) -> None:
    from weights.formats.metadata import ExportInfo
    from weights.io import save_adapter

    pipe = tiny_sdxl_pipe()
    ad = make_adapter(pipe.unet, "lora", rank=4, seed=1, noise=0.5)
    path = tmp_path / "person.safetensors"
    save_adapter(ad, path, "kohya", arch="sdxl", info=ExportInfo(trigger="ohwx person", arch="sdxl"))
    before = _weights(pipe)
    base = run_pipe(pipe, seed=5)
    p = personalize(pipe, adapter=path, scale=1.0)
    assert p.trigger == "ohwx person"
    out = run_pipe(pipe, seed=5)
    assert np.abs(out - base).mean() > 1e-4
    p.set_scale(0)
    assert _same(_weights(pipe), before) and np.array_equal(run_pipe(pipe, seed=5), base)
    p.set_scale(1.0)
    assert np.allclose(run_pipe(pipe, seed=5), out, atol=1e-5)
    p.remove()
    p.remove()  # idempotent
    assert _same(_weights(pipe), before)
    assert np.array_equal(run_pipe(pipe, seed=5), base)
    # a native adapter object works too, and the kohya file read back has the same effect as the object
    with personalize(pipe, adapter=ad, trigger="ohwx person"):
        assert np.allclose(run_pipe(pipe, seed=5), out, atol=1e-5)
    assert _same(_weights(pipe), before)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"photos": ["x.jpg"], "adapter": "a.safetensors"}, ValueError, "either photos"),
        ({}, ValueError, "either photos"),
        ({"photos": ["x.jpg"]}, ValueError, "need hypernet"),
        ({"adapter": "a.safetensors", "scale": float("nan")}, ValueError, "scale must be a finite number"),
        ({"adapter": "a.safetensors", "scale": 5}, ValueError, r"scale must be .* in \[-2, 3\]"),
        ({"adapter": "a.safetensors", "trigger": "x" * 300}, ValueError, "trigger must be"),
        ({"adapter": "missing.safetensors"}, ValueError, "no such file"),
        ({"photos": ["x.jpg"], "hypernet": "no/such/dir"}, FileNotFoundError, "no such folder"),
    ],
)
def test_bad_calls_say_what_is_wrong(kwargs, error, match, tmp_path, monkeypatch) -> None:
    from tests.utils.tiny_pipes import tiny_sd15_pipe

    monkeypatch.chdir(tmp_path)
    pipe = tiny_sd15_pipe()
    photos = kwargs.pop("photos", None)
    with pytest.raises(error, match=match):
        personalize(pipe, photos, **kwargs)


def test_not_a_pipeline_and_wrong_base_model(tmp_path) -> None:
    from tests.utils.tiny_pipes import tiny_sd15_pipe
    from weights.errors import AdapterFileError
    from weights.io import save_adapter

    with pytest.raises(TypeError, match="expected a diffusers pipeline with a UNet"):
        personalize(object(), adapter="a.safetensors")
    sd15 = tiny_sd15_pipe()
    save_adapter(make_adapter(sd15.unet), tmp_path / "sd15.safetensors", "diffusers")
    xl = tiny_sdxl_pipe()
    before = _weights(xl)
    with pytest.raises(AdapterFileError, match="another base model"):
        personalize(xl, adapter=tmp_path / "sd15.safetensors")
    assert _same(_weights(xl), before)


@needs_tiny
def test_photos_without_a_face_are_refused(sd15, tmp_path) -> None:
    from PIL import Image

    Image.new("RGB", (96, 96), (120, 130, 140)).save(tmp_path / "wall.png")
    before = _weights(sd15)
    with pytest.raises(ValueError, match="no usable face"):
        personalize(sd15, [str(tmp_path / "wall.png")], hypernet=TINY_HYPERNET)
    assert _same(_weights(sd15), before)
