"""Export metadata (weights.formats.metadata): kohya ``ss_*`` and SAI ``modelspec.*`` keys in every LoRA format,
read back by this project and by the tools' own readers (safetensors headers, diffusers, peft)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from tests.utils.adapters import make_adapter
from tests.utils.tiny_pipes import tiny_sd15_unet
from weights.cli import main
from weights.formats.metadata import ExportInfo, read_export_info, trigger_of
from weights.io import export_info, load_any, save_adapter
from weights.safetensors_io import read_header

INFO = ExportInfo(title="obama", trigger="sks person", caption="a photo of sks person", base_model="tiny",
                  resolution=64, num_images=3, seed=7, made_by="difflora hypernet prediction")  # fmt: skip


@pytest.fixture(scope="module")
def adapter():
    return make_adapter(tiny_sd15_unet(), "lora", 4, seed=1)


def _meta(path):
    return read_header(path / "adapter_model.safetensors" if path.is_dir() else path)[1]


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "peft"])
def test_every_lora_format_carries_the_training_metadata(adapter, tmp_path, fmt) -> None:
    out = tmp_path / ("peft" if fmt == "peft" else f"{fmt}.safetensors")
    save_adapter(adapter, out, fmt, info=INFO)
    meta = _meta(out)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "4.0" and meta["ss_base_model_version"] == "sd_v1"
    assert json.loads(meta["ss_tag_frequency"]) == {"difflora": {"a photo of sks person": 3}}
    assert meta["ss_num_train_images"] == "3" and meta["ss_seed"] == "7" and meta["ss_resolution"] == "(64, 64)"
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.title"] == "obama" and meta["modelspec.trigger_phrase"] == "sks person"
    assert meta["modelspec.resolution"] == "64x64" and meta["modelspec.date"].endswith("Z")
    # the hash is the SHA-256 of the file without its header (what the model spec and sd-scripts define)
    raw = (out / "adapter_model.safetensors" if out.is_dir() else out).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert meta["modelspec.hash_sha256"] == "0x" + hashlib.sha256(raw[8 + n :]).hexdigest()
    back = export_info(out)
    assert (back.title, back.trigger, back.caption, back.num_images, back.seed) == (
        "obama",
        "sks person",
        "a photo of sks person",
        3,
        7,
    )
    # the file still loads as the same adapter
    a2 = load_any(out)
    for lay in adapter.spec.layers:
        p, q = adapter.layer_params(lay.name), a2.layer_params(lay.name)
        torch.testing.assert_close(q["B"] @ q["A"] * a2.spec.scale, p["B"] @ p["A"] * adapter.spec.scale)


def test_sdxl_and_defaults(adapter, tmp_path) -> None:
    save_adapter(adapter, tmp_path / "x.safetensors", "kohya", arch="sdxl")
    meta = _meta(tmp_path / "x.safetensors")
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.resolution"] == "1024x1024" and "modelspec.trigger_phrase" not in meta
    assert read_export_info(meta).arch == "sdxl"


def test_diffusers_file_with_metadata_loads_in_stock_diffusers(adapter, tmp_path) -> None:
    from tests.utils.tiny_pipes import tiny_sd15_pipe

    save_adapter(adapter, tmp_path / "pytorch_lora_weights.safetensors", "diffusers", info=INFO)
    pipe = tiny_sd15_pipe()
    pipe.load_lora_weights(str(tmp_path), weight_name="pytorch_lora_weights.safetensors")
    assert pipe.get_list_adapters()["unet"]


@pytest.mark.parametrize(
    "caption, cls, trigger",
    [("a photo of sks person", "a photo of a person", "sks person"), ("ohwx man", "a man", "ohwx man"),
     ("a photo of a person", "a photo of a person", "a photo of a person")],
)  # fmt: skip
def test_trigger_of(caption, cls, trigger) -> None:
    assert trigger_of(caption, cls) == trigger


@pytest.mark.parametrize(
    "kw, match",
    [({"title": "x" * 201}, "title must be printable"), ({"trigger": "a\nb"}, "trigger must be printable"),
     ({"arch": "sd3"}, "arch must be one of"), ({"num_images": 0}, "num_images must be")],
)  # fmt: skip
def test_bad_info_names_the_field(kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        ExportInfo(**kw)


def test_convert_keeps_the_metadata_and_takes_new_text(adapter, tmp_path, capsys) -> None:
    src = tmp_path / "in.safetensors"
    save_adapter(adapter, src, "diffusers", info=INFO)
    out = tmp_path / "k.safetensors"
    assert main(["convert", str(src), str(out), "--to", "kohya"]) == 0
    assert export_info(out).trigger == "sks person" and export_info(out).title == "obama"
    out2 = tmp_path / "k2.safetensors"
    assert main(["convert", str(src), str(out2), "--to", "kohya", "--trigger", "ohwx person", "--title", "me"]) == 0
    assert (export_info(out2).trigger, export_info(out2).title) == ("ohwx person", "me")
    capsys.readouterr()
    assert main(["convert", str(src), str(tmp_path / "k3.safetensors"), "--to", "kohya", "--trigger", "x" * 300]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--trigger must be printable text of at most 200" in err
