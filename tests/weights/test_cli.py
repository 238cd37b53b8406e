"""``difflora adapter info|convert``: output, conversions with SVD error summary, one-line errors on bad input."""

from __future__ import annotations

import json

import pytest
import torch

from service.cli import main as difflora
from tests.utils.adapters import make_adapter
from tests.utils.tiny_pipes import tiny_sd15_unet
from weights import detect_format, load_any, save_adapter
from weights.cli import main
from weights.convert import layer_deltas

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def unet():
    return tiny_sd15_unet()


def test_info_text_and_json(unet, tmp_path, capsys):
    ad = make_adapter(unet, "lora", 4, targets=["to_q", "to_v"], alpha=2.0, seed=1)
    f = tmp_path / "a.safetensors"
    save_adapter(ad, f, "kohya")
    assert main(["info", str(f)]) == 0
    out = capsys.readouterr().out
    for word in ("kohya", "lora", "rank", "layers", "trainable_params", "|dW|_F"):
        assert word in out
    assert difflora(["adapter", "info", str(f), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["format"] == "kohya" and d["rank"] == 4 and d["alpha"] == 2.0 and d["layers"] == len(ad.spec.layers)
    assert d["trainable_params"] == sum(4 * (lay.shape[0] + lay.shape[1]) for lay in ad.spec.layers)
    assert d["delta_norm"]["max"] > 0


@pytest.mark.parametrize("to", ["diffusers", "kohya", "peft", "native"])
def test_convert_svfit_prints_svd_summary(unet, tmp_path, capsys, to):
    ad = make_adapter(unet, "svfit", 4, targets=["to_q", "to_k"], seed=2, noise=1.0)
    src = tmp_path / "svfit.safetensors"
    save_adapter(ad, src)
    out = tmp_path / ("peft_out" if to == "peft" else "out.safetensors")
    assert main(["convert", str(src), str(out), "--to", to, "--rank", "2"]) == 0
    text = capsys.readouterr().out
    assert "relative error" in text and "rank 2" in text
    assert detect_format(out) == to
    back = load_any(out)
    assert back.spec.method == "lora" and back.spec.rank == 2


def test_convert_lora_to_diffusers_is_exact(unet, tmp_path, capsys):
    ad = make_adapter(unet, "lora", 4, targets=["to_q"], seed=3)
    src, out = tmp_path / "n.safetensors", tmp_path / "d.safetensors"
    save_adapter(ad, src)
    assert main(["convert", str(src), str(out), "--to", "diffusers"]) == 0
    assert "exact" in capsys.readouterr().out
    back = {lay.name: dW for lay, dW, _ in layer_deltas(load_any(out))}
    for lay, dW, _ in layer_deltas(ad):
        torch.testing.assert_close(back[lay.name], dW)


@pytest.mark.parametrize(
    "argv_tail, content",
    [
        (["info"], b"\x80\x04\x95garbage pickle"),
        (["info"], b"short"),
        (["convert", "--to", "diffusers"], b"\x80\x04\x95garbage pickle"),
    ],
)
def test_bad_input_one_line_error(tmp_path, capsys, argv_tail, content):
    f = tmp_path / "bad.safetensors"
    f.write_bytes(content)
    argv = [argv_tail[0], str(f)] + (["out.safetensors"] + argv_tail[1:] if argv_tail[0] == "convert" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("difflora adapter") and "error" in err and len(err.splitlines()) == 1


def test_missing_file_and_bad_usage(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope.safetensors")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main(["convert", "a", "b", "--to", "onnx"]) == 2  # argparse rejects the format
    assert main([]) == 2


@pytest.mark.parametrize(
    "rank, message",
    [("0", "rank must be >= 1, got 0"), ("-1", "rank must be >= 1"), ("100000", "largest rank any layer")],
)
def test_convert_rejects_useless_ranks(unet, tmp_path, capsys, rank, message):
    """0 is not "keep the rank" (omit --rank for that); a rank no layer can hold would only zero-pad the file."""
    src = tmp_path / "s.safetensors"
    save_adapter(make_adapter(unet, "svfit", 4, targets=["to_q"], seed=2, noise=1.0), src)
    assert main(["convert", str(src), str(tmp_path / "o.safetensors"), "--to", "diffusers", "--rank", rank]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_info_and_convert_read_adapters_with_integer_buffers(unet, tmp_path, capsys):
    """LoLDU stores its pivots as int64: detection must read the header, the LoRA export still converts."""
    ad = make_adapter(unet, "loldu", 4, targets=["to_q"], seed=4, noise=1.0)
    src, out = tmp_path / "loldu.safetensors", tmp_path / "d.safetensors"
    save_adapter(ad, src)
    assert main(["info", str(src)]) == 0
    assert "loldu" in capsys.readouterr().out
    assert main(["convert", str(src), str(out), "--to", "diffusers"]) == 0
    back = {lay.name: dW for lay, dW, _ in layer_deltas(load_any(out))}
    for lay, dW, _ in layer_deltas(ad):
        torch.testing.assert_close(back[lay.name], dW, rtol=1e-4, atol=1e-5)


def test_convert_base_accepts_a_pipeline_or_unet_folder(tmp_path, capsys):
    from tests.utils.tiny_pipes import tiny_sd15_pipe

    pipe = tiny_sd15_pipe()
    pipe.save_pretrained(tmp_path / "pipe")
    ad = make_adapter(pipe.unet, "tlora", 4, targets=["to_q"], noise=1.0, seed=2)  # conversion needs the base
    f = tmp_path / "t.safetensors"
    save_adapter(ad, f)
    outs = []
    for base in (tmp_path / "pipe", tmp_path / "pipe" / "unet"):
        out = tmp_path / f"{base.name}.safetensors"
        assert main(["convert", str(f), str(out), "--to", "diffusers", "--rank", "2", "--base", str(base)]) == 0
        outs.append(load_any(out))
    a, b = ([dW for _, dW, _ in layer_deltas(o)] for o in outs)  # LoRA outputs: ΔW needs no base
    assert len(a) == len(b) == len(ad.spec.layers)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    capsys.readouterr()


@pytest.mark.parametrize(
    ("base", "message"),
    [
        ("{tmp}/nope", "--base {tmp}/nope: no such folder"),
        ("{tmp}/t.safetensors", "--base {tmp}/t.safetensors: not a folder"),
        ("{tmp}", "--base {tmp}: neither a diffusers pipeline folder (unet/config.json) nor a UNet folder"),
        ("nope", "--base nope: no such folder"),
    ],
)
def test_convert_bad_base_is_a_one_line_error(unet, tmp_path, capsys, base, message):
    f = tmp_path / "t.safetensors"
    save_adapter(make_adapter(unet, "tlora", 4, targets=["to_q"], seed=2), f)
    base, message = base.format(tmp=tmp_path), message.format(tmp=tmp_path)
    assert main(["convert", str(f), str(tmp_path / "o.safetensors"), "--to", "kohya", "--base", base]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
