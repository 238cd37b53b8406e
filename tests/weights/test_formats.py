"""Exported files load in stock diffusers / peft and give the same images as our merge; readers round-trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.utils.adapters import make_adapter
from tests.utils.tiny_pipes import run_pipe, tiny_sd15_pipe, tiny_sd15_unet, tiny_sdxl_pipe, tiny_sdxl_unet
from weights import apply_adapter, load_any, restore, save_adapter
from weights.convert import layer_deltas
from weights.formats import export_needs_base, keeps_dora
from weights.formats.diffusers import METADATA_KEY, from_diffusers, to_diffusers
from weights.formats.kohya import from_sgm, load_kohya, to_sgm
from weights.formats.native import load_native
from weights.formats.peft import load_peft, save_peft
from weights.methods import METHODS
from weights.safetensors_io import read_safetensors

torch.set_num_threads(1)

PIPES = {"sd15": tiny_sd15_pipe, "sdxl": tiny_sdxl_pipe}
# attention, feed-forward, projections and resnet convs/time projections (Linear, 1x1 and 3x3 Conv2d)
ALL = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "time_emb_proj",
]
TOL = 1e-4


def _ours(pipe, adapter, scale=1.0):
    base = run_pipe(pipe)
    st = apply_adapter(pipe.unet, adapter, scale)
    img = run_pipe(pipe)
    restore(pipe.unet, st)
    assert np.abs(img - base).max() > 1e-3, "the adapter does not change the image: the test would prove nothing"
    return img


def _deltas_equal(a, b, base=None):
    da = {lay.name: dW for lay, dW, _ in layer_deltas(a, base)}
    db = {lay.name: dW for lay, dW, _ in layer_deltas(b, base)}
    assert set(da) == set(db)
    for k in da:
        torch.testing.assert_close(da[k], db[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_diffusers_state_dict_loads_in_stock_pipeline_same_images(kind):
    pipe = PIPES[kind]()
    ad = make_adapter(pipe.unet, "lora", 4, targets=ALL, alpha=2.0, noise=1.0, seed=1)
    ours = _ours(pipe, ad, 0.8)
    sd, meta, report = to_diffusers(ad)
    assert report.exact and all(k.startswith("unet.") for k in sd)
    pipe.load_lora_weights(sd, adapter_name="id1")
    pipe.set_adapters(["id1"], [0.8])
    theirs = run_pipe(pipe)
    assert np.abs(ours - theirs).max() <= TOL
    _deltas_equal(ad, from_diffusers(sd, meta))


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_diffusers_file_with_alpha_metadata_loads_same_images(kind, tmp_path):
    pipe = PIPES[kind]()
    ad = make_adapter(pipe.unet, "lora", 4, targets=["to_q", "to_k", "to_v", "to_out.0"], alpha=1.0, noise=1.0, seed=2)
    ours = _ours(pipe, ad)
    f = tmp_path / "pytorch_lora_weights.safetensors"
    save_adapter(ad, f, "diffusers", bake_scale=False)  # raw A, B; alpha = 1 lives only in the metadata
    _, meta = read_safetensors(f)
    cfg = json.loads(meta[METADATA_KEY])
    assert meta["format"] == "pt" and cfg["unet.r"] == 4 and cfg["unet.lora_alpha"] == 1.0
    pipe.load_lora_weights(str(tmp_path), weight_name=f.name)
    pipe.fuse_lora(lora_scale=1.0)
    theirs = run_pipe(pipe)
    assert np.abs(ours - theirs).max() <= TOL
    back = load_any(f)
    assert back.spec.alpha == 1.0 and back.spec.rank == 4
    _deltas_equal(ad, back)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_kohya_file_through_diffusers_conversion_same_images(kind, tmp_path):
    pipe = PIPES[kind]()
    ad = make_adapter(pipe.unet, "lora", 4, targets=ALL + ["conv_shortcut"], alpha=2.0, noise=1.0, seed=3)
    ours = _ours(pipe, ad)
    f = tmp_path / "identity.safetensors"
    save_adapter(ad, f, "kohya", arch=kind)
    sd, meta = read_safetensors(f)
    assert all(k.startswith("lora_unet_") for k in sd)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["modelspec.architecture"].endswith("/lora")
    if kind == "sdxl":
        assert any("input_blocks_4_1_transformer_blocks_0_attn1_to_q" in k for k in sd)
        assert not any("down_blocks" in k for k in sd)
    pipe.load_lora_weights(str(f))  # diffusers' own kohya (and sgm) conversion
    theirs = run_pipe(pipe)
    assert np.abs(ours - theirs).max() <= TOL
    names = [n for n, _ in pipe.unet.named_modules()]
    for back in (
        load_kohya(f),
        load_kohya(f, module_names=names),
        load_any(f, tiny_sdxl_unet() if kind == "sdxl" else None),
    ):
        _deltas_equal(ad, back)


def test_sgm_names_round_trip_and_known_examples():
    for n, _ in tiny_sdxl_unet().named_modules():
        assert from_sgm(to_sgm(n)) == n
    cases = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.4.1.transformer_blocks.0.attn1.to_q",  # noqa: E501
        "down_blocks.2.attentions.1.proj_in": "input_blocks.8.1.proj_in",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k": "middle_block.1.transformer_blocks.0.attn2.to_k",
        "up_blocks.0.attentions.2.proj_out": "output_blocks.2.1.proj_out",
        "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2": "output_blocks.3.1.transformer_blocks.0.ff.net.2",
        "down_blocks.0.resnets.1.conv1": "input_blocks.2.0.in_layers.2",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
    }
    for diff, sgm in cases.items():
        assert to_sgm(diff) == sgm and from_sgm(sgm) == diff


def _unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 16, 16, generator=g)
    ehs = torch.randn(1, 7, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, 10, encoder_hidden_states=ehs).sample


def test_peft_folder_loads_with_peft(tmp_path):
    from peft import LoraConfig, PeftModel, set_peft_model_state_dict

    unet = tiny_sd15_unet()
    ad = make_adapter(unet, "lora", 4, targets=ALL, alpha=8.0, noise=1.0, seed=4)
    base = _unet_out(unet)
    st = apply_adapter(unet, ad)
    ours = _unet_out(unet)
    restore(unet, st)
    assert (ours - base).abs().max() > 1e-3
    folder = tmp_path / "peft_adapter"
    report = save_peft(ad, folder)
    assert report.exact and {p.name for p in folder.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    wrapped = PeftModel.from_pretrained(tiny_sd15_unet(), str(folder))
    assert (_unet_out(wrapped.base_model.model) - ours).abs().max() <= TOL
    u2 = tiny_sd15_unet()
    cfg = LoraConfig.from_pretrained(str(folder))
    u2.add_adapter(cfg)
    sd, _ = read_safetensors(folder / "adapter_model.safetensors")
    res = set_peft_model_state_dict(u2, {k.removeprefix("base_model.model."): v for k, v in sd.items()})
    assert not [k for k in res.unexpected_keys if "lora" in k]
    assert (_unet_out(u2) - ours).abs().max() <= TOL
    _deltas_equal(ad, load_peft(folder))


def test_dora_exports_natively_and_loads_same_images(tmp_path):
    pipe = tiny_sd15_pipe()
    ad = make_adapter(pipe.unet, "dora", 4, targets=["to_q", "to_k", "to_v", "to_out.0", "proj_in"], noise=1.0, seed=5)
    ours = _ours(pipe, ad)
    sd, meta, report = to_diffusers(ad)
    assert report.exact and any(k.endswith("lora_magnitude_vector") for k in sd)
    assert json.loads(meta[METADATA_KEY])["unet.use_dora"] is True
    pipe.load_lora_weights(sd, adapter_name="d")
    theirs = run_pipe(pipe)
    assert np.abs(ours - theirs).max() <= TOL
    back = from_diffusers(sd, meta)
    assert back.spec.method == "dora"
    _deltas_equal(ad, back, base=pipe.unet)


@pytest.mark.parametrize("method", ["svfit", "loldu"])
def test_low_rank_methods_export_exactly_by_svd(method, tmp_path):
    pipe = tiny_sd15_pipe()
    ad = make_adapter(pipe.unet, method, 4, targets=["to_q", "to_k", "to_v", "to_out.0"], noise=1.0, seed=6)
    ours = _ours(pipe, ad)
    f = tmp_path / "lora.safetensors"
    report = save_adapter(ad, f, "diffusers")
    assert not report.exact and report.max_error < 1e-5  # ΔW has rank <= 4: the rank-4 SVD is exact
    pipe.load_lora_weights(str(f))
    assert np.abs(ours - run_pipe(pipe)).max() <= TOL


def test_multiplicative_method_needs_base_and_reports_error(tmp_path):
    unet = tiny_sd15_unet()
    ad = make_adapter(unet, "tlora", 4, targets=["to_q", "to_out.0"], noise=1.0, seed=7)
    with pytest.raises(ValueError, match="base weights"):
        save_adapter(ad, tmp_path / "x.safetensors", "diffusers")
    report = save_adapter(ad, tmp_path / "x.safetensors", "kohya", base=unet, rank=2)
    assert report.rank == 2 and len(report.errors) == len(ad.spec.layers)
    assert 0 < report.max_error < 1 and "relative error" in report.summary()
    report8 = save_adapter(ad, tmp_path / "y.safetensors", "diffusers", base=unet, rank=8)
    assert report8.mean_error < report.mean_error


@pytest.mark.parametrize("method", sorted(METHODS))
def test_native_round_trip_is_lossless(method, tmp_path):
    unet = tiny_sd15_unet()
    targets = ["to_out.0", "ff.net.2"] if method == "arc" else ["to_q", "proj_in"]
    ad = make_adapter(unet, method, 2, targets=targets, seed=8)
    f = tmp_path / "a.safetensors"
    save_adapter(ad, f)
    back = load_native(f)
    assert back.spec.to_json() == ad.spec.to_json()
    assert set(back.tensors) == set(ad.tensors)
    assert all(torch.equal(back.tensors[k], v) for k, v in ad.tensors.items())


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize(("fmt", "rank"), [("diffusers", None), ("diffusers", 2), ("kohya", None), ("peft", None)])
def test_export_needs_base_predicts_what_save_does_without_base(method, fmt, rank, tmp_path):
    unet = tiny_sd15_unet()
    targets = ["to_out.0", "ff.net.2"] if method == "arc" else ["to_q", "proj_in"]
    ad = make_adapter(unet, method, 4, targets=targets, seed=3)
    expected = method in ("dora", "tlora", "arc") and not (method == "dora" and fmt != "kohya" and rank is None)
    assert export_needs_base(ad.spec, fmt, rank) is expected
    assert export_needs_base(ad.spec, "native") is False
    out = tmp_path / ("a" if fmt == "peft" else "a.safetensors")
    if expected:
        with pytest.raises(ValueError, match="base weights"):
            save_adapter(ad, out, fmt, rank=rank)
    else:
        save_adapter(ad, out, fmt, rank=rank)
        assert load_any(out).spec.method == ("dora" if keeps_dora(ad.spec, fmt, rank) else "lora")


def test_mixed_ranks_without_alpha_load_at_scale_one_like_diffusers():
    pipe = tiny_sd15_pipe()
    g = torch.Generator().manual_seed(5)
    sd = {}
    names = [n for n, m in pipe.unet.named_modules() if n.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v"))][:3]
    for name, r in zip(names, (4, 4, 8)):  # majority rank 4, one layer at rank 8, no alpha anywhere
        w = pipe.unet.get_submodule(name).weight
        sd[f"unet.{name}.lora_A.weight"] = 0.3 * torch.randn(r, w.shape[1], generator=g)
        sd[f"unet.{name}.lora_B.weight"] = 0.3 * torch.randn(w.shape[0], r, generator=g)
    ad = from_diffusers(sd, {})
    for lay, dW, _ in layer_deltas(ad):
        A, B = sd[f"unet.{lay.name}.lora_A.weight"], sd[f"unet.{lay.name}.lora_B.weight"]
        torch.testing.assert_close(dW, B @ A, rtol=1e-5, atol=1e-6)  # scale 1, the rank-8 layer too
    ours = _ours(pipe, ad)
    pipe.load_lora_weights(sd)
    assert np.abs(ours - run_pipe(pipe)).max() <= TOL
