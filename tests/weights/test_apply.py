"""apply_adapter / restore on a real (tiny) diffusers UNet: exact merge, bit-identical restore, errors."""

from __future__ import annotations

import pytest
import torch

from tests.utils.adapters import make_adapter
from tests.utils.tiny_pipes import tiny_sd15_unet, tiny_sdxl_unet
from weights import AdapterMismatchError, NonFiniteWeightsError, StaleStateError, apply_adapter, restore
from weights.apply import applied, release
from weights.methods import METHODS, get_method, method_config

torch.set_num_threads(1)

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]
ARC_TARGETS = ["to_out.0", "ff.net.2", "proj_in"]  # ARC moves biases: only layers that have one


@pytest.fixture(scope="module")
def unet():
    return tiny_sd15_unet().eval()


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_bit_identical(model, snap):
    for k, v in model.state_dict().items():
        assert v.dtype == snap[k].dtype
        assert torch.equal(v, snap[k]), f"{k} differs after restore"


def _expected(snap, adapter, name, scale=1.0):
    m = get_method(adapter.spec.method)
    cfg = method_config(adapter.spec)
    W0 = snap[name + ".weight"].float()
    p = adapter.layer_params(name)
    key = m.shared_key(tuple(W0.shape), cfg)
    if key is not None:
        p = {**p, **adapter.shared_params(key)}
    return W0 + scale * m.delta(W0, p, cfg).float()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_apply_merges_method_delta_and_restores_exactly(unet, method):
    ad = make_adapter(unet, method, 4, targets=ARC_TARGETS if method == "arc" else TARGETS, seed=1)
    snap = _snapshot(unet)
    state = apply_adapter(unet, ad, scale=0.7, inplace=method != "lora")  # lora: the swap mode
    assert applied(unet) is state and state.layers == tuple(lay.name for lay in ad.spec.layers)
    for lay in ad.spec.layers:
        got = unet.get_submodule(lay.name).weight.detach()
        torch.testing.assert_close(got, _expected(snap, ad, lay.name, 0.7), rtol=1e-5, atol=1e-6)
        assert not torch.equal(got, snap[lay.name + ".weight"]), "adapter had no effect"
    restore(unet, state)
    assert applied(unet) is None
    _assert_bit_identical(unet, snap)


@pytest.mark.parametrize(
    "dtype, inplace",
    [(torch.float32, True), (torch.float16, True), (torch.bfloat16, True), (torch.bfloat16, False)],
    ids=["fp32", "fp16", "bf16", "bf16-swap"],
)
def test_thousand_swaps_restore_bit_identical(dtype, inplace):
    model = tiny_sd15_unet(seed=3).to(dtype)
    snap = _snapshot(model)
    a = make_adapter(model, "lora", 4, seed=1, noise=1.0)
    b = make_adapter(model, "lora", 4, seed=2, noise=1.0, targets=["to_q", "to_v", "proj_in"])
    first = {}
    for i in range(1000):
        ad = a if i % 2 == 0 else b
        st = apply_adapter(model, ad, scale=1.0 + (i % 3) * 0.25, inplace=inplace)  # direct A -> B, no subtraction
        if i < 6:
            first[i % 6] = _snapshot(model)
        elif i >= 994:  # the same (adapter, scale) as in the first cycle gives the same bits: no drift
            for k, v in model.state_dict().items():
                assert torch.equal(v, first[i % 6][k]), f"drift in {k} at swap {i}"
        if i % 250 == 249:
            restore(model, st)
            _assert_bit_identical(model, snap)
    restore(model)
    _assert_bit_identical(model, snap)
    release(model)
    _assert_bit_identical(model, snap)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "swap"])
def test_every_method_in_half_precision_swaps_and_restores_bit_identical(dtype, inplace):
    model = tiny_sd15_unet(seed=4).to(dtype)
    snap = _snapshot(model)
    ads = [
        make_adapter(model, m, 4, seed=i, noise=1.0, targets=ARC_TARGETS if m == "arc" else TARGETS)
        for i, m in enumerate(sorted(METHODS))
    ]
    for rnd in range(3):  # every method after every other one, directly, at two scales
        for i, ad in enumerate(ads):
            apply_adapter(model, ad, scale=0.5 + 0.5 * ((i + rnd) % 2), inplace=inplace)
    restore(model)
    _assert_bit_identical(model, snap)


def test_swap_to_subset_restores_untouched_layers(unet):
    snap = _snapshot(unet)
    a = make_adapter(unet, "lora", 2, seed=4, targets=["to_q", "to_k"])
    b = make_adapter(unet, "lora", 2, seed=5, targets=["to_q"])
    apply_adapter(unet, a)
    st = apply_adapter(unet, b)
    for lay in a.spec.layers:
        w = unet.get_submodule(lay.name).weight.detach()
        if lay.name.endswith("to_k"):
            assert torch.equal(w, snap[lay.name + ".weight"])
        else:
            torch.testing.assert_close(w, _expected(snap, b, lay.name), rtol=1e-5, atol=1e-6)
    restore(unet, st)
    _assert_bit_identical(unet, snap)


def test_stale_state_is_rejected(unet):
    a = make_adapter(unet, "lora", 2, seed=6)
    b = make_adapter(unet, "lora", 2, seed=7)
    sa = apply_adapter(unet, a)
    sb = apply_adapter(unet, b)
    with pytest.raises(StaleStateError, match="no longer applied"):
        restore(unet, sa)
    restore(unet, sb)
    with pytest.raises(StaleStateError):
        restore(unet, sb)
    restore(unet)  # nothing applied: no-op


def test_external_change_while_restored_becomes_new_original(unet):
    ad = make_adapter(unet, "lora", 2, seed=8, targets=["to_q"])
    restore(unet, apply_adapter(unet, ad))
    name = ad.spec.layers[0].name
    w = unet.get_submodule(name).weight
    with torch.no_grad():
        w.mul_(0.5)  # e.g. a training step on the base model
    new_base = w.detach().clone()
    st = apply_adapter(unet, ad)
    torch.testing.assert_close(
        w.detach(), new_base + _expected({name + ".weight": new_base}, ad, name) - new_base, rtol=1e-5, atol=1e-6
    )
    restore(unet, st)
    assert torch.equal(w.detach(), new_base)
    with torch.no_grad():
        w.mul_(2.0)


@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("then", ["lora", "dora", "svfit"])
def test_swap_from_arc_to_another_method_puts_the_bias_back(then, inplace):
    unet = tiny_sd15_unet().eval()
    snap = _snapshot(unet)
    arc = make_adapter(unet, "arc", 4, targets=["to_out.0"], seed=3, noise=1.0)
    other = make_adapter(unet, then, 4, targets=["to_out.0"], seed=4)
    apply_adapter(unet, arc, inplace=inplace)
    name = arc.spec.layers[0].name
    assert not torch.equal(unet.get_submodule(name).bias, snap[name + ".bias"])  # ARC moved it
    st = apply_adapter(unet, other, inplace=inplace)  # direct swap, no restore in between
    assert torch.equal(unet.get_submodule(name).bias, snap[name + ".bias"])
    torch.testing.assert_close(unet.get_submodule(name).weight.detach(), _expected(snap, other, name))
    restore(unet, st)
    _assert_bit_identical(unet, snap)


def test_bias_changed_while_restored_becomes_new_original():
    unet = tiny_sd15_unet().eval()
    arc = make_adapter(unet, "arc", 4, targets=["to_out.0"], seed=3, noise=1.0)
    name = arc.spec.layers[0].name
    b = unet.get_submodule(name).bias
    restore(unet, apply_adapter(unet, arc))
    with torch.no_grad():
        b.add_(1.0)  # e.g. a training step on the base model
    new_bias = b.detach().clone()
    st = apply_adapter(unet, arc)
    assert not torch.equal(b.detach(), new_bias)
    restore(unet, st)
    assert torch.equal(b.detach(), new_bias)


def test_safe_mode_rejects_non_finite_and_restores():
    model = tiny_sd15_unet(seed=4).half()
    snap = _snapshot(model)
    ad = make_adapter(model, "lora", 2, seed=9, targets=["to_q"])
    for k in ad.tensors:
        ad.tensors[k] = torch.full_like(ad.tensors[k], 300.0)  # 4 * 300 * 300 > fp16 max
    with pytest.raises(NonFiniteWeightsError, match="non-finite"):
        apply_adapter(model, ad, safe=True)
    assert applied(model) is None
    _assert_bit_identical(model, snap)


def test_wrong_base_model_gives_clear_errors(unet):
    xl = tiny_sdxl_unet()
    ad = make_adapter(xl, "lora", 2, seed=10)
    snap = _snapshot(unet)
    with pytest.raises(AdapterMismatchError, match="does not exist in the model|shape"):
        apply_adapter(unet, ad)
    _assert_bit_identical(unet, snap)
    ad = make_adapter(unet, "lora", 2, seed=11, targets=["to_q"])
    bad = ad.spec.layers[0]
    ad.tensors[f"{bad.name}::A"] = torch.zeros(2, bad.shape[1] + 1)
    with pytest.raises(AdapterMismatchError, match=bad.name.replace(".", r"\.")):
        apply_adapter(unet, ad)
    _assert_bit_identical(unet, snap)
    assert applied(unet) is None


def test_dtype_cast_while_applied_restores_cast_originals():
    model = tiny_sd15_unet(seed=5)
    snap = _snapshot(model)
    st = apply_adapter(model, make_adapter(model, "lora", 2, seed=12, targets=["to_q"]))
    model.half()  # replaces every weight tensor while the adapter is merged
    restore(model, st)
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k].half()), k


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "swap"])
def test_storage_semantics_of_both_modes(inplace):
    model = tiny_sd15_unet(seed=6)
    ad = make_adapter(model, "lora", 2, seed=13, targets=["to_q"])
    w = model.get_submodule(ad.spec.layers[0].name).weight
    ptr = w.data_ptr()
    apply_adapter(model, ad, inplace=inplace)
    assert (w.data_ptr() == ptr) == inplace  # in place: same storage; swap: the merged buffer
    restore(model)
    assert w.data_ptr() == ptr  # both modes end on the original storage
    apply_adapter(model, ad, inplace=not inplace)  # switching modes restores first, then merges again
    restore(model)
    assert w.data_ptr() == ptr
