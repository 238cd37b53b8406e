"""Base-model registry: presets, errors naming the path, loading sd1 / sdxl folders with stock diffusers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline_data.models import PRESETS, ModelNotFoundError, get_preset, load_pipeline, resolve_source


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


def _tiny_sd1(path: Path) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from pipeline_data.tiny.tokenizer import write_tokenizer

    torch.manual_seed(0)
    tok = CLIPTokenizer.from_pretrained(str(write_tokenizer(path / "_tok")))
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=4,
            max_position_embeddings=77,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=32,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tok,
        unet=unet,
        scheduler=DDIMScheduler(steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(path))


def test_load_sd1_folder_by_path(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    _tiny_sd1(tmp_path / "m")
    pipe = load_pipeline(str(tmp_path / "m"), device="cpu")
    assert isinstance(pipe, StableDiffusionPipeline) and pipe.unet.dtype == torch.float32
    img = pipe("a photo of a person", num_inference_steps=2, height=16, width=16, output_type="np").images
    assert img.shape == (1, 16, 16, 3)


def test_load_sdxl_folder_by_path(tmp_path: Path) -> None:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from pipeline_data.tiny.tokenizer import write_tokenizer

    torch.manual_seed(0)
    tok = CLIPTokenizer.from_pretrained(str(write_tokenizer(tmp_path / "_tok")))
    cfg = {
        "vocab_size": len(tok),
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "projection_dim": 32,
    }
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=80,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=32,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(CLIPTextConfig(**cfg)),
        tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**cfg)),
        tokenizer_2=tok,
        unet=unet,
        scheduler=EulerDiscreteScheduler(),
    )
    pipe.save_pretrained(str(tmp_path / "xl"))
    loaded = load_pipeline(str(tmp_path / "xl"), device="cpu")
    assert isinstance(loaded, StableDiffusionXLPipeline)
    img = loaded("a photo", num_inference_steps=2, height=16, width=16, output_type="np").images
    assert img.shape == (1, 16, 16, 3)
