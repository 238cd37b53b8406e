"""The identity basis: exact LoRA export in every format, file round-trip, apply == per-sample forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline_data.recipe import FULL_TARGETS
from tests.utils.tiny_pipes import TEXT_DIM, tiny_sd15_unet
from weights.apply import apply_adapter, restore
from weights.basis import (
    BasisModule,
    IdentityBasis,
    basis_per_sample,
    basis_to_lora,
    basis_up,
    init_basis,
    load_basis,
    save_basis,
)
from weights.errors import AdapterFileError
from weights.io import load_any, save_adapter
from weights.per_sample import per_sample_adapters

K, RANK = 5, 3


@pytest.fixture(scope="module")
def unet():
    return tiny_sd15_unet().eval()


@pytest.fixture(scope="module")
def basis(unet) -> IdentityBasis:
    """A basis with random (non-zero) directions; alpha 6 at rank 3 (LoRA scale 2) so the scale is exercised."""
    b = init_basis(unet, FULL_TARGETS, K, RANK, generator=torch.Generator().manual_seed(0), alpha=6.0, base_model="t")
    g = torch.Generator().manual_seed(1)
    for name, u in b.up.items():
        b.up[name] = torch.randn(u.shape, generator=g) * 0.05
    b.metadata["identities"] = "a,b,c"
    return b


def codes(n: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, K, generator=torch.Generator().manual_seed(seed))


def test_a_fresh_basis_is_zero_and_covers_linear_and_conv_layers(unet) -> None:
    b = init_basis(unet, FULL_TARGETS, K, RANK, generator=torch.Generator().manual_seed(0))
    assert {lay.kind for lay in b.spec.layers} == {"linear", "conv"}
    assert b.num_directions == K and b.rank == RANK
    assert all(float(u.abs().max()) == 0 for u in b.up.values())
    A = b.down[b.spec.layers[0].name]
    assert abs(float(A.std()) * A.shape[1] ** 0.5 - 1.0) < 0.2  # N(0, 1/fan-in)
    ad = basis_to_lora(b, codes(1)[0])
    assert all(float(t.abs().max()) == 0 for k, t in ad.tensors.items() if k.endswith("::B"))


def test_basis_up_is_linear_in_the_code(basis) -> None:
    c1, c2 = codes(2)
    u = next(iter(basis.up.values()))
    torch.testing.assert_close(basis_up(u, c1 + 2 * c2), basis_up(u, c1) + 2 * basis_up(u, c2), atol=1e-6, rtol=0)
    torch.testing.assert_close(basis_up(u, torch.stack([c1, c2]))[1], basis_up(u, c2))


def delta_of(basis: IdentityBasis, code: torch.Tensor, layer: str) -> torch.Tensor:
    return basis.spec.scale * basis_up(basis.up[layer], code) @ basis.down[layer]  # (m, n_flat)


@pytest.mark.parametrize("fmt", ["native", "diffusers", "kohya", "peft"])
def test_exported_lora_carries_exactly_the_basis_delta(unet, basis, fmt, tmp_path: Path) -> None:
    c = codes(1, seed=3)[0]
    ad = basis_to_lora(basis, c)
    assert ad.spec.method == "lora" and ad.spec.rank == RANK and ad.spec.scale == 2.0
    path = tmp_path / ("peft" if fmt == "peft" else f"a_{fmt}.safetensors")
    report = save_adapter(ad, path, fmt)
    assert report is None or (report.exact and report.max_error == 0.0)
    back = load_any(path, unet)
    before = {lay.name: unet.get_submodule(lay.name).weight.detach().clone() for lay in basis.spec.layers}
    state = apply_adapter(unet, back)
    try:
        for lay in basis.spec.layers:
            w = unet.get_submodule(lay.name).weight.detach()
            dW = (w - before[lay.name]).reshape(w.shape[0], -1)
            torch.testing.assert_close(dW, delta_of(basis, c, lay.name), atol=1e-6, rtol=1e-5)
    finally:
        restore(unet, state)


def test_save_load_round_trip(basis, tmp_path: Path) -> None:
    path = tmp_path / "basis.safetensors"
    save_basis(basis, path)
    back = load_basis(path)
    assert back.spec == basis.spec and back.metadata == basis.metadata
    assert back.fingerprint() == basis.fingerprint()
    for name in basis.down:
        assert torch.equal(back.down[name], basis.down[name]) and torch.equal(back.up[name], basis.up[name])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # atomic: no temp file left


def test_apply_equals_per_sample_forward(unet, basis) -> None:
    cs = codes(3, seed=4)
    g = torch.Generator().manual_seed(5)
    x, t, ctx = torch.randn(3, 4, 16, 16, generator=g), torch.tensor([10, 500, 900]), torch.randn(3, 7, TEXT_DIM)
    with torch.no_grad(), per_sample_adapters(unet, basis_per_sample(basis, cs, [1.0, 0.5, 1.0])):
        out = unet(x, t, encoder_hidden_states=ctx).sample
    for i, lam in enumerate([1.0, 0.5, 1.0]):
        state = apply_adapter(unet, basis_to_lora(basis, cs[i]), lam)
        try:
            with torch.no_grad():
                ref = unet(x[i : i + 1], t[i : i + 1], encoder_hidden_states=ctx[i : i + 1]).sample
        finally:
            restore(unet, state)
        torch.testing.assert_close(out[i : i + 1], ref, atol=1e-5, rtol=0)


def test_module_wrapper_trains_codes_and_directions(unet, basis) -> None:
    mod = BasisModule(basis)
    c = codes(2, seed=6).requires_grad_(True)
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([100, 700]), torch.randn(2, 7, TEXT_DIM)
    with per_sample_adapters(unet, mod.per_sample(c)):
        unet(x, t, encoder_hidden_states=ctx).sample.pow(2).mean().backward()
    assert c.grad is not None and float(c.grad.abs().max()) > 0
    assert all(p.grad is not None for p in mod.parameters())
    assert all(p.grad is None for p in unet.parameters())
    back = mod.to_basis()
    assert back.fingerprint() == basis.fingerprint()
    frozen = BasisModule(basis, train_down=False)
    assert not any(p.requires_grad for p in frozen.down) and all(p.requires_grad for p in frozen.up)


def test_bad_basis_files_are_clear_errors(unet, basis, tmp_path: Path) -> None:
    from tests.utils.adapters import make_adapter

    native = tmp_path / "adapter.safetensors"
    save_adapter(make_adapter(unet), native)
    with pytest.raises(AdapterFileError, match="not an identity basis"):
        load_basis(native)
    with pytest.raises(AdapterFileError, match="no such basis file"):
        load_basis(tmp_path / "missing.safetensors")
    good = tmp_path / "basis.safetensors"
    save_basis(basis, good)
    with pytest.raises(AdapterFileError, match="is an identity basis, not an adapter"):
        load_any(good)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(AdapterFileError, match="truncated"):
        load_basis(cut)
    with pytest.raises(ValueError, match="code has 4 values"):
        basis_to_lora(basis, torch.zeros(4))
    bad = dict(basis.up)
    name = next(iter(bad))
    bad[name] = bad[name][:, :, :2]
    with pytest.raises(ValueError, match="expected"):
        IdentityBasis(basis.spec, basis.down, bad)
