"""Base-model registry: presets, errors naming the path, loading sd1 / sdxl folders with stock diffusers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline_data.models import PRESETS, ModelNotFoundError, get_preset, load_pipeline, resolve_source
from tests.utils.tiny_pipes import tiny_sd15_pipe, tiny_sdxl_pipe


def test_presets_registry() -> None:
    assert set(PRESETS) >= {"tiny", "sd15", "sdxl"}
    tiny = get_preset("tiny")
    assert tiny.local_only and tiny.family == "sd1" and tiny.source.endswith("assets/tiny/base")
    assert get_preset("sdxl").family == "sdxl" and get_preset("sd15").gpu_dtype == "float16"
    with pytest.raises(ValueError, match="unknown base model preset 'sd3'"):
        get_preset("sd3")


def test_missing_local_model_names_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelNotFoundError, match="nowhere"):
        load_pipeline(str(missing))
    monkeypatch.setenv("DIFFLORA_SD15_PATH", str(missing))
    assert resolve_source(get_preset("sd15")) == str(missing)
    with pytest.raises(ModelNotFoundError, match="nowhere"):
        load_pipeline("sd15")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        load_pipeline(str(tmp_path / "empty"))


def test_load_sd1_folder_by_path(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    tiny_sd15_pipe().save_pretrained(str(tmp_path / "m"))
    pipe = load_pipeline(str(tmp_path / "m"), device="cpu")
    assert isinstance(pipe, StableDiffusionPipeline) and pipe.unet.dtype == torch.float32
    img = pipe("a photo of a person", num_inference_steps=2, height=16, width=16, output_type="np").images
    assert img.shape == (1, 16, 16, 3)


def test_load_sdxl_folder_by_path(tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    tiny_sdxl_pipe().save_pretrained(str(tmp_path / "xl"))
    loaded = load_pipeline(str(tmp_path / "xl"), device="cpu")
    assert isinstance(loaded, StableDiffusionXLPipeline)
    img = loaded("a photo", num_inference_steps=2, height=16, width=16, output_type="np").images
    assert img.shape == (1, 16, 16, 3)
