"""Safe loading: every bad file gives one clear AdapterFileError; format detection; atomic writes."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from tests.utils.adapters import make_adapter
from tests.utils.tiny_pipes import tiny_sd15_unet, tiny_sdxl_unet
from weights import AdapterFileError, detect_format, load_any, save_adapter
from weights.formats.native import SPEC_KEY
from weights.safetensors_io import read_safetensors

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def unet():
    return tiny_sd15_unet()


@pytest.fixture(scope="module")
def adapter(unet):
    return make_adapter(unet, "lora", 2, targets=["to_q", "to_k"], seed=1)


@pytest.fixture
def good(adapter, tmp_path):
    f = tmp_path / "good.safetensors"
    save_adapter(adapter, f)
    return f


def _expect(path, reason, match=None, model=None):
    with pytest.raises(AdapterFileError) as ei:
        load_any(path, model)
    assert ei.value.reason == reason, str(ei.value)
    assert isinstance(ei.value, ValueError)
    assert "\n" not in str(ei.value)
    if match:
        assert match in str(ei.value)
    return ei.value


@pytest.mark.parametrize("fmt", ["native", "diffusers", "kohya", "peft"])
def test_detect_and_load_each_format(adapter, unet, tmp_path, fmt):
    out = tmp_path / ("peft_dir" if fmt == "peft" else f"a_{fmt}.safetensors")
    save_adapter(adapter, out, fmt)
    assert detect_format(out) == fmt
    back = load_any(out, unet)
    assert back.spec.method == "lora" and len(back.spec.layers) == len(adapter.spec.layers)


def test_pickle_renamed_to_safetensors(adapter, tmp_path):
    f = tmp_path / "evil.safetensors"
    torch.save(adapter.tensors, f)  # a zip-based torch.save checkpoint
    _expect(f, "pickle", "refusing")
    g = tmp_path / "legacy.safetensors"
    torch.save(adapter.tensors, g, _use_new_zipfile_serialization=False)  # raw pickle stream
    _expect(g, "pickle", "pickle")


def test_truncated_file(good, tmp_path):
    data = good.read_bytes()
    f = tmp_path / "cut.safetensors"
    f.write_bytes(data[: len(data) - 100])
    _expect(f, "truncated", "truncated")
    f.write_bytes(data[:5])
    _expect(f, "truncated")


def test_non_finite_values(unet, tmp_path):
    ad = make_adapter(unet, "lora", 2, targets=["to_q"], seed=2)
    k = next(iter(ad.tensors))
    ad.tensors[k][0, 0] = float("nan")
    f = tmp_path / "nan.safetensors"
    save_adapter(ad, f)
    _expect(f, "non_finite", "NaN")
    ad.tensors[k][0, 0] = float("inf")
    save_adapter(ad, f, "diffusers")
    _expect(f, "non_finite")


def test_missing_and_invalid_metadata(adapter, tmp_path):
    f = tmp_path / "nometa.safetensors"
    save_file({k: v.contiguous() for k, v in adapter.tensors.items()}, f)
    _expect(f, "metadata", SPEC_KEY)
    save_file({k: v.contiguous() for k, v in adapter.tensors.items()}, f, metadata={SPEC_KEY: "{not json"})
    _expect(f, "metadata", "JSON")


def test_unknown_method(adapter, tmp_path):
    d = json.loads(adapter.spec.to_json())
    d["method"] = "magic"
    f = tmp_path / "magic.safetensors"
    save_file({k: v.contiguous() for k, v in adapter.tensors.items()}, f, metadata={SPEC_KEY: json.dumps(d)})
    _expect(f, "unknown_method", "magic")


def test_wrong_base_model_shape_mismatch(adapter, good, tmp_path):
    _expect(good, "base_model", "another base model", model=tiny_sdxl_unet())
    xl = tiny_sdxl_unet()
    f = tmp_path / "xl.safetensors"
    save_adapter(make_adapter(xl, "lora", 2, targets=["to_k"], seed=3), f, "diffusers")
    _expect(f, "base_model", model=tiny_sd15_unet())


def test_tensor_shapes_inconsistent_with_spec(adapter, tmp_path):
    t = dict(adapter.tensors)
    k = next(k for k in t if k.endswith("::A"))
    t[k] = torch.zeros(3, t[k].shape[1])
    f = tmp_path / "bad_shape.safetensors"
    save_file({k: v.contiguous() for k, v in t.items()}, f, metadata={SPEC_KEY: adapter.spec.to_json()})
    _expect(f, "shape", "rank 2")


def test_header_bomb_and_size_limit(good, tmp_path):
    f = tmp_path / "bomb.safetensors"
    f.write_bytes(struct.pack("<Q", 10**12) + b"{" + b" " * 64)
    _expect(f, "too_large")
    with pytest.raises(AdapterFileError) as ei:
        read_safetensors(good, max_bytes=64)
    assert ei.value.reason == "too_large"


@pytest.mark.parametrize(
    "payload, reason",
    [(b"", "truncated"), (os.urandom(64), None), (b"hello world, not a tensor file at all", None)],
)
def test_garbage_files(tmp_path, payload, reason):
    f = tmp_path / "junk.safetensors"
    f.write_bytes(payload)
    with pytest.raises(AdapterFileError) as ei:
        load_any(f)
    assert reason is None or ei.value.reason == reason
    assert "\n" not in str(ei.value)


def test_integer_tensor_in_lora_file_rejected(tmp_path):
    f = tmp_path / "int.safetensors"
    save_file({"unet.a.to_q.lora_A.weight": torch.zeros(2, 4, dtype=torch.int32)}, f)
    _expect(f, "dtype")


def test_unknown_layout_and_missing_path(tmp_path):
    f = tmp_path / "other.safetensors"
    save_file({"model.weight": torch.zeros(2)}, f)
    _expect(f, "format")
    _expect(tmp_path / "nope.safetensors", "missing")
    (tmp_path / "empty_dir").mkdir()
    _expect(tmp_path / "empty_dir", "format")


def test_atomic_write_keeps_old_file_on_failure(adapter, good, tmp_path, monkeypatch):
    before = good.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(adapter, good)
    monkeypatch.undo()
    assert good.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.safetensors"]  # no temp file left behind


def test_written_files_follow_the_umask(adapter, tmp_path):
    """Adapters get the same permissions as any file the process writes (0666 & ~umask), not mkstemp's 0600."""
    old = os.umask(0o022)
    try:
        save_adapter(adapter, tmp_path / "a.safetensors")
        (tmp_path / "plain").write_bytes(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o644 == (tmp_path / "plain").stat().st_mode & 0o777


def test_write_errors_name_the_output_not_the_temp_file(adapter, tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    cases = [
        (tmp_path / "file" / "a.safetensors", NotADirectoryError, str(tmp_path / "file")),
        (tmp_path, IsADirectoryError, str(tmp_path)),
    ]
    if os.geteuid() != 0:  # root writes anywhere
        cases.append((tmp_path / "ro" / "a.safetensors", PermissionError, str(tmp_path / "ro" / "a.safetensors")))
    try:
        for path, exc, named in cases:
            with pytest.raises(exc) as ei:
                save_adapter(adapter, path)
            assert ei.value.filename == named and ".tmp" not in str(ei.value)
    finally:
        (tmp_path / "ro").chmod(0o700)
