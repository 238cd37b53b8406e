"""Adapter ↔ tokens: exact round trips, canonicalisation keeps ΔW, templates for frozen tensors, statistics."""

from __future__ import annotations

import math

import pytest
import torch

from tests.utils.adapters import make_adapter
from tests.utils.tiny_pipes import tiny_sd15_unet
from weights import TokenLayout, TokenStats, adapter_to_tokens, canonicalize_lora, split_template, tokens_to_adapter
from weights.adapter import Adapter
from weights.convert import layer_deltas, to_lora
from weights.methods import METHODS, get_method

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def unet():
    return tiny_sd15_unet()


def _targets(method):
    return ["to_out.0", "ff.net.2"] if method == "arc" else ["to_q", "to_k", "proj_in"]


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("token_dim", [64, 100])
def test_tokens_round_trip_exact(unet, method, token_dim):
    ad = make_adapter(unet, method, 4, targets=_targets(method), seed=1)
    layout = TokenLayout.from_adapter(ad, token_dim)
    trainable, template = split_template(ad)
    tok = adapter_to_tokens(ad, layout)
    assert tok.shape == (layout.num_tokens, token_dim) and tok.dtype == torch.float32
    mask = layout.mask
    assert not tok[~mask].any(), "padding must be zero"
    assert int(mask.sum()) == sum(t.numel() for t in trainable.tensors.values())
    back = tokens_to_adapter(tok, layout, ad.spec, template)
    ref = canonicalize_lora(ad) if {"A", "B"} <= set(get_method(method).trainable) else ad
    assert set(back.tensors) == set(ad.tensors)
    for k, v in ref.tensors.items():
        assert torch.equal(back.tensors[k], v.float() if v.is_floating_point() else v), k
    assert torch.equal(adapter_to_tokens(back, layout, canonicalize=False), tok)  # exact both ways
    torch.testing.assert_close(adapter_to_tokens(back, layout), tok, rtol=1e-3, atol=1e-5)  # canonical is a fixpoint


def test_layout_ids_and_chunking(unet):
    ad = make_adapter(unet, "lora", 4, targets=["to_q", "to_k"], seed=2)
    D = 48
    layout = TokenLayout.from_adapter(ad, D)
    sizes = [4 * (lay.shape[0] + lay.shape[1]) for lay in ad.spec.layers]
    assert layout.group_sizes == sizes
    assert layout.group_tokens == [math.ceil(s / D) for s in sizes]
    ids, pos = layout.layer_ids, layout.pos_ids
    assert ids.shape == pos.shape == (layout.num_tokens,)
    for g, n in enumerate(layout.group_tokens):
        assert torch.equal(pos[ids == g], torch.arange(n))
    assert TokenLayout.from_dict(layout.to_dict()) == layout
    raw = TokenLayout.from_adapter(ad, D, canonicalize=False)
    assert TokenLayout.from_dict(raw.to_dict()) == raw and not raw.canonicalize
    old = {k: v for k, v in layout.to_dict().items() if k != "canonicalize"}  # files written before the option
    assert TokenLayout.from_dict(old).canonicalize
    assert torch.equal(adapter_to_tokens(ad, raw), adapter_to_tokens(ad, layout, canonicalize=False))
    assert not torch.equal(adapter_to_tokens(ad, raw), adapter_to_tokens(ad, layout))
    other = make_adapter(unet, "lora", 2, targets=["to_q", "to_k"], seed=2)
    with pytest.raises(ValueError, match="does not match"):
        adapter_to_tokens(other, layout)


def test_svfit_tokens_hold_only_trainable_values(unet):
    a = make_adapter(unet, "svfit", 4, targets=["to_q", "to_v"], seed=3)
    b = make_adapter(unet, "svfit", 4, targets=["to_q", "to_v"], seed=4)
    layout = TokenLayout.from_adapter(a, 16)
    assert int(layout.mask.sum()) == 4 * len(a.spec.layers)  # sigma only; U, Vh, sigma0 stay in the template
    _, tmpl_a = split_template(a)
    _, tmpl_b = split_template(b)
    assert all(torch.equal(tmpl_a.tensors[k], tmpl_b.tensors[k]) for k in tmpl_a.tensors)  # same for all identities
    back = tokens_to_adapter(adapter_to_tokens(b, layout), layout, b.spec, tmpl_a)
    _same_deltas(b, back)


def _same_deltas(a, b, base=None, tol=1e-5):
    for (la, da, _), (lb, db, _) in zip(layer_deltas(a, base), layer_deltas(b, base)):
        assert la.name == lb.name
        torch.testing.assert_close(da, db, rtol=tol, atol=tol * float(da.abs().max() + 1e-12))


def test_canonicalisation_keeps_delta_and_removes_gauge(unet):
    ad = make_adapter(unet, "lora", 4, targets=["to_q", "to_k", "proj_in"], alpha=2.0, noise=1.0, seed=5)
    can = canonicalize_lora(ad)
    _same_deltas(ad, can)
    g = torch.Generator().manual_seed(0)
    gauged = {}
    for lay in ad.spec.layers:
        R = torch.randn(4, 4, generator=g, dtype=torch.float64) + 3 * torch.eye(4, dtype=torch.float64)
        A, B = ad.tensors[f"{lay.name}::A"].double(), ad.tensors[f"{lay.name}::B"].double()
        gauged[f"{lay.name}::A"] = (torch.linalg.inv(R) @ A).float()  # (r, n)
        gauged[f"{lay.name}::B"] = (B @ R).float()  # (m, r): same BA
    can2 = canonicalize_lora(Adapter(ad.spec, gauged))
    for k, v in can.tensors.items():
        torch.testing.assert_close(can2.tensors[k], v, rtol=1e-3, atol=1e-4)
    for lay in ad.spec.layers:  # canonical factors: B = U√S and A = √S Vᵀ have equal, orthogonal Gram matrices
        A, B = can.tensors[f"{lay.name}::A"].double(), can.tensors[f"{lay.name}::B"].double()
        torch.testing.assert_close(B.T @ B, A @ A.T, rtol=1e-4, atol=1e-6)
        off = (B.T @ B) - torch.diag(torch.diag(B.T @ B))
        assert off.abs().max() < 1e-4 * (B.T @ B).abs().max()


def test_dora_is_canonicalised_too(unet):
    ad = make_adapter(unet, "dora", 4, targets=["to_q"], noise=1.0, seed=6)
    layout = TokenLayout.from_adapter(ad, 64)
    back = tokens_to_adapter(adapter_to_tokens(ad, layout), layout, ad.spec)
    _same_deltas(ad, back, base=unet)


def test_lora_rerank_by_svd_reports_error(unet):
    ad = make_adapter(unet, "lora", 4, targets=["to_q", "to_k"], noise=1.0, seed=7)
    low, rep = to_lora(ad, 2)
    assert low.spec.rank == 2 and 0 < rep.max_error < 1
    same, rep4 = to_lora(ad, 4)
    assert rep4.exact and same is ad
    high, rep8 = to_lora(ad, 8)
    assert rep8.max_error < 1e-6
    _same_deltas(ad, high)


@pytest.mark.parametrize("mode", ["element", "token", "global"])
def test_token_stats_normalise_round_trip(unet, mode, tmp_path):
    ads = [make_adapter(unet, "lora", 2, targets=["to_q"], noise=1.0, seed=s) for s in range(6)]
    layout = TokenLayout.from_adapter(ads[0], 32)
    toks = torch.stack([adapter_to_tokens(a, layout) for a in ads])  # (N, T, D)
    mask = layout.mask
    stats = TokenStats.fit([toks[:3], toks[3:]], mask, mode=mode)  # streamed over two batches
    z = stats.normalize(toks)
    assert not z[:, ~mask].any()
    if mode == "element":
        real = z[:, mask]  # (N, values)
        assert real.mean(0).abs().max() < 1e-4
    elif mode == "global":
        assert abs(float(z[:, mask].mean())) < 1e-4 and abs(float(z[:, mask].std(unbiased=False)) - 1) < 1e-3
    torch.testing.assert_close(stats.denormalize(z), toks, rtol=1e-5, atol=1e-6)
    f = tmp_path / "stats.safetensors"
    stats.save(f)
    back = TokenStats.load(f)
    assert (
        back.mode == mode and back.count == 6 and torch.equal(back.mean, stats.mean) and torch.equal(back.mask, mask)
    )
