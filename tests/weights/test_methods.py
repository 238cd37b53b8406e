"""Per-method math: zero init, forward == merged weight, counts on SD 1.5 shapes, method-specific invariants."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from weights.methods import METHODS, MethodConfig, get_method
from weights.methods.snell import sparsify
from weights.methods.tlora import factorize, trm_matrix

torch.set_num_threads(1)

NAMES = sorted(METHODS)
SCALE = {"lora": 0.5, "dora": 0.5, "loldu": 0.25}  # non-trivial scales where the method has one
# layer kinds: Linear (m != n both ways), 1x1 conv, 3x3 conv with stride/padding
KINDS = {
    "linear": lambda: nn.Linear(12, 10),
    "linear_wide": lambda: nn.Linear(10, 16),
    "conv1x1": lambda: nn.Conv2d(6, 8, 1),
    "conv3x3": lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1),
}


def cfg_for(name: str, rank: int = 4) -> MethodConfig:
    return MethodConfig(rank=rank, scale=SCALE.get(name, 1.0))


def supported(name: str, kind: str) -> bool:
    m = METHODS[name]
    if kind.startswith("conv"):
        return m.supports_conv and (kind == "conv1x1" or not m.conv_1x1_only)
    return True


def init_all(name: str, layer: nn.Module, cfg: MethodConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    m, g = METHODS[name], torch.Generator().manual_seed(seed)
    W = layer.weight.detach()
    p = m.init_layer(W, cfg, g)
    key = m.shared_key(tuple(W.shape), cfg)
    if key is not None:
        p.update(m.init_shared(tuple(W.shape), cfg, g))
    return p


def perturb(name: str, p: dict[str, torch.Tensor], seed: int = 1, std: float = 0.3) -> dict[str, torch.Tensor]:
    """Move every trainable tensor away from init (so ΔW != 0 and every factor gets gradient)."""
    m, g = METHODS[name], torch.Generator().manual_seed(seed)
    train = set(m.trainable) | set(m.shared_trainable())
    return {k: v + std * torch.randn(v.shape, generator=g) if k in train else v for k, v in p.items()}


def op_of(layer: nn.Module):
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward
    return lambda x, w, b: F.linear(x, w, b)


def x_for(layer: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    if isinstance(layer, nn.Conv2d):
        return torch.randn((2, layer.in_channels, 7, 7), generator=g)
    return torch.randn((3, 5, layer.in_features), generator=g)


CASES = [(n, k) for n in NAMES for k in KINDS if supported(n, k)]


def test_registry():
    assert NAMES == ["arc", "dora", "hta", "loldu", "lora", "snell", "svfit", "tlora"]
    import weights.methods as wm

    assert wm.__all__ == sorted(wm.__all__)
    with pytest.raises(ValueError, match="lora"):
        get_method("nope")


@pytest.mark.parametrize("name,kind", CASES)
def test_zero_init(name, kind):
    torch.manual_seed(0)
    layer = KINDS[kind]()
    cfg, m = cfg_for(name), METHODS[name]
    p = init_all(name, layer, cfg)
    dW = m.delta(layer.weight.detach(), p, cfg)
    assert dW.shape == layer.weight.shape and dW.dtype == layer.weight.dtype
    if m.zero_init:
        assert dW.abs().max() == 0
        db = m.bias_delta(layer.weight.detach(), p, cfg)
        assert db is None or db.abs().max() == 0
    else:  # SNELL: the documented ΔW != 0 at init
        assert name == "snell" and dW.abs().max() > 0
    assert set(p) - set(m.shared_trainable()) == set(m.trainable) | set(m.frozen)  # every tensor is declared
    # the trainable tensors of init_layer add up to num_trainable
    assert sum(p[k].numel() for k in m.trainable) == m.num_trainable(tuple(layer.weight.shape), cfg)


@pytest.mark.parametrize("name,kind", CASES)
def test_forward_matches_merged(name, kind):
    torch.manual_seed(0)
    layer = KINDS[kind]()
    cfg, m = cfg_for(name), METHODS[name]
    p = perturb(name, init_all(name, layer, cfg))
    W, b, x = layer.weight.detach(), layer.bias.detach(), x_for(layer)
    dW = m.delta(W, p, cfg)
    assert dW.abs().max() > 0
    db = m.bias_delta(W, p, cfg)
    merged = op_of(layer)(x, W + dW, b if db is None else b + db)
    out = m.forward(x, W, b, p, cfg, op_of(layer))
    torch.testing.assert_close(out, merged, atol=1e-5, rtol=1e-5)


class _RecordingConfig(MethodConfig):
    """A MethodConfig that records every params key the method asks for."""

    def get(self, key: str, default: object = None) -> object:
        object.__getattribute__(self, "asked").add(key)
        return super().get(key, default)


@pytest.mark.parametrize("name", NAMES)
def test_param_keys_are_the_keys_the_method_reads(name):
    m = METHODS[name]
    cfg = _RecordingConfig(rank=4, scale=SCALE.get(name, 1.0))
    object.__setattr__(cfg, "asked", set())
    kinds = ["linear", "conv1x1"] if m.supports_conv else ["linear"]
    for kind in kinds:
        layer = KINDS[kind]()
        p = perturb(name, init_all(name, layer, cfg))
        m.delta(layer.weight.detach(), p, cfg)
        m.forward(x_for(layer), layer.weight.detach(), layer.bias.detach(), p, cfg, op_of(layer))
    assert tuple(sorted(cfg.asked)) == tuple(sorted(m.param_keys))


@pytest.mark.parametrize("name", NAMES)
def test_unsupported_shapes_raise(name):
    m, cfg = METHODS[name], cfg_for(name)
    with pytest.raises(ValueError):
        m.init_layer(torch.randn(4, 4, 3), cfg)
    if not m.supports_conv or m.conv_1x1_only:
        with pytest.raises(ValueError, match="Conv2d"):
            m.init_layer(torch.randn(8, 6, 3, 3), cfg)


@pytest.mark.parametrize("name", NAMES)
def test_delta_half_precision(name):
    """delta computes in fp32 and returns W's dtype and shape."""
    layer, cfg, m = nn.Linear(12, 10), cfg_for(name), METHODS[name]
    p = perturb(name, init_all(name, layer, cfg))
    W16 = layer.weight.detach().half()
    d16 = m.delta(W16, p, cfg)
    assert d16.dtype == torch.float16 and d16.shape == W16.shape
    torch.testing.assert_close(d16.float(), m.delta(W16.float(), p, cfg), atol=2e-3, rtol=1e-2)


# ---- trainable counts on SD 1.5 attention (docs/weights.md §2e), from shapes only -------------------------
def sd15_attention_shapes() -> list[tuple[int, int]]:
    shapes = []
    for C, blocks in ((320, 5), (640, 5), (1280, 6)):
        for _ in range(blocks):
            shapes += [(C, C)] * 4  # attn1 q, k, v, out.0
            shapes += [(C, C), (C, 768), (C, 768), (C, C)]  # attn2 q, k, v, out.0
    return shapes


def expected_count(name: str, shapes: list[tuple[int, int]], r: int) -> int:
    """The summary-table formulas, written out independently of the method code."""
    if name in ("lora", "snell"):
        return sum(r * (m + n) for m, n in shapes)
    if name == "dora":
        return sum(r * (m + n) + m for m, n in shapes)
    if name in ("svfit", "loldu"):
        return r * len(shapes)
    if name == "hta":
        return sum(m + n + min(m, n) + m + n for m, n in shapes)
    if name == "arc":  # shared D (n, r) per input width + (r + n) per layer
        return sum(n * r for n in {n for _, n in shapes}) + sum(r + n for _, n in shapes)
    if name == "tlora":
        return sum(
            r * r * (sum(f * f for f in factorize(n)) + sum(factorize(m)) + sum(factorize(n))) for m, n in shapes
        )
    raise AssertionError(name)


def method_count(name: str, shapes: list[tuple[int, int]], cfg: MethodConfig) -> int:
    m = METHODS[name]
    total = sum(m.num_trainable(s, cfg) for s in shapes)
    groups = {m.shared_key(s, cfg): s for s in shapes if m.shared_key(s, cfg) is not None}
    for s in groups.values():
        shared = m.init_shared(s, cfg)
        total += sum(shared[k].numel() for k in m.shared_trainable())
    return total


@pytest.mark.parametrize("name", NAMES)
def test_sd15_attention_counts(name):
    shapes, cfg = sd15_attention_shapes(), MethodConfig(rank=4)
    assert len(shapes) == 128
    assert method_count(name, shapes, cfg) == expected_count(name, shapes, 4)


def test_sd15_table_numbers():
    shapes, cfg = sd15_attention_shapes(), MethodConfig(rank=4)
    assert method_count("lora", shapes, cfg) == 797_184
    assert method_count("dora", shapes, cfg) == 797_184 + 99_840
    assert method_count("svfit", shapes, cfg) == method_count("loldu", shapes, cfg) == 512
    assert method_count("lora", shapes, MethodConfig(rank=16)) == 3_188_736


# ---- method-specific invariants ---------------------------------------------------------------------------
def test_lora_conv_is_kohya_layout():
    W = torch.randn(8, 6, 3, 3)
    p = METHODS["lora"].init_layer(W, MethodConfig(rank=2))
    assert p["A"].shape == (2, 54) and p["B"].shape == (8, 2)
    gauss = METHODS["lora"].init_layer(W, MethodConfig(rank=2, params=(("init", "gaussian"),)))
    assert gauss["B"].abs().max() == 0
    with pytest.raises(ValueError, match="init"):
        METHODS["lora"].init_layer(W, MethodConfig(rank=2, params=(("init", "bogus"),)))


def test_dora_row_norm_equals_magnitude():
    layer, cfg, m = nn.Conv2d(6, 8, 3), cfg_for("dora"), METHODS["dora"]
    p = perturb("dora", init_all("dora", layer, cfg))
    W = layer.weight.detach()
    Wp = (W + m.delta(W, p, cfg)).reshape(8, -1)  # norm over (c_in, kh, kw)
    torch.testing.assert_close(Wp.norm(dim=1), p["magnitude"], atol=1e-5, rtol=1e-5)


def test_svfit_removes_top_singular_values():
    W, cfg, m = torch.randn(10, 12), MethodConfig(rank=3), METHODS["svfit"]
    p = m.init_layer(W, cfg)
    p["sigma"] = torch.zeros(3)  # W' = W_e: the top-3 spectrum is gone
    S = torch.linalg.svdvals(W)
    torch.testing.assert_close(torch.linalg.svdvals(W + m.delta(W, p, cfg))[:7], S[3:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(10, 12), (12, 10), (8, 3, 3, 3)])
def test_loldu_pivots_are_indices(shape):
    W, m = torch.randn(shape), METHODS["loldu"]
    k = min(shape[0], W[0].numel())
    p = m.init_layer(W, MethodConfig(rank=k))
    assert p["perm"].dtype == torch.int64 and p["perm"].shape == (shape[0],)
    assert sorted(p["perm"].tolist()) == list(range(shape[0]))
    # full rank: P L diag(z0) Ū reproduces W (so setting z = 0 removes W entirely)
    rec = (p["L"][p["perm"]] * p["z0"]) @ p["U"]
    torch.testing.assert_close(rec, W.reshape(shape[0], -1), atol=1e-5, rtol=1e-5)
    p["z"] = torch.zeros(k)
    assert (W + m.delta(W, p, MethodConfig(rank=k))).abs().max() < 1e-5


@pytest.mark.parametrize(
    "n,expected", [(320, (5, 8, 8)), (768, (8, 8, 12)), (1280, (8, 10, 16)), (7, (1, 1, 7)), (14, (1, 2, 7))]
)
def test_tlora_factorize(n, expected):
    assert factorize(n) == expected


def test_tlora_transform_is_identity_at_init():
    p = METHODS["tlora"].init_layer(torch.randn(4, 320), MethodConfig(rank=3))
    T = trm_matrix([p[f"T{d}"] for d in range(3)])
    torch.testing.assert_close(T, torch.eye(320), atol=1e-6, rtol=0)


def test_hta_reflections_orthogonal_at_init():
    p = METHODS["hta"].init_layer(torch.randn(10, 12), MethodConfig())
    for v in (p["v_l"], p["v_r"]):
        H = torch.eye(v.numel()) - torch.outer(v, v)
        torch.testing.assert_close(H @ H.T, torch.eye(v.numel()), atol=1e-5, rtol=0)


def test_arc_shared_per_width():
    m, cfg = METHODS["arc"], MethodConfig(rank=4)
    assert m.shared_key((320, 768), cfg) == m.shared_key((640, 768), cfg) != m.shared_key((320, 320), cfg)


def test_snell_sparsity_and_large_quantile():
    m = METHODS["snell"]
    W = torch.randn(20, 30)
    p = m.init_layer(W, MethodConfig(rank=4, params=(("sparsity", 0.75),)))
    dW = m.delta(W, p, MethodConfig(rank=4, params=(("sparsity", 0.75),)))
    assert (dW == 0).float().mean().item() == pytest.approx(0.75, abs=0.01)
    dense = m.delta(W, p, MethodConfig(rank=4, params=(("sparsity", 0.0),)))
    assert (dense != 0).all()
    big = torch.randn(2**24 + 7)  # torch.quantile refuses this size; kthvalue does not
    out = sparsify(big, 0.5)
    assert (out != 0).sum().item() == pytest.approx(big.numel() / 2, rel=1e-3)
    with pytest.raises(ValueError, match="even"):
        m.init_layer(W, MethodConfig(rank=3))


@pytest.mark.parametrize(("n", "s"), [(9, 0.5), (10, 0.25), (7, 0.5), (600, 0.5), (40, 0.3), (1000, 0.9)])
def test_snell_threshold_is_torch_quantile(n, s):
    from weights.methods.snell import quantile

    x = torch.rand(n, generator=torch.Generator().manual_seed(n)) - 0.5
    t = torch.quantile(x.abs(), s)
    torch.testing.assert_close(quantile(x.abs(), s), t)
    expected = x * torch.nn.functional.threshold(x.abs(), float(t), 0.0)  # the reference's sparsify
    torch.testing.assert_close(sparsify(x, s), expected)


def test_snell_init_bound_is_the_references_stacked_fan_in():
    m, n, r = 40, 30, 8
    p = METHODS["snell"].init_layer(torch.randn(m, n), MethodConfig(rank=r), torch.Generator().manual_seed(0))
    for name, fan_in in (("a1", n * r // 2), ("a2", n * r // 2), ("b1", m * r // 2), ("b2", m * r // 2)):
        bound = fan_in**-0.5  # kaiming_uniform_(a=sqrt 5) on a (2, rows, r/2) tensor
        assert p[name].abs().max() <= bound and p[name].abs().max() > 0.9 * bound


def test_svfit_lowrank_init():
    W = torch.randn(40, 50)
    W[:, :3] += 5.0  # a dominant direction the randomized SVD must find
    exact = METHODS["svfit"].init_layer(W, MethodConfig(rank=2))
    fast = METHODS["svfit"].init_layer(W, MethodConfig(rank=2, params=(("svd", "lowrank"),)))
    torch.testing.assert_close(fast["sigma0"][0], exact["sigma0"][0], rtol=1e-4, atol=1e-4)
    assert METHODS["svfit"].delta(W, fast, MethodConfig(rank=2)).abs().max() == 0
    with pytest.raises(ValueError, match="svd"):
        METHODS["svfit"].init_layer(W, MethodConfig(rank=2, params=(("svd", "qr"),)))


def test_tlora_identity_reg():
    m, cfg = METHODS["tlora"], MethodConfig(rank=2)
    p = m.init_layer(torch.randn(6, 8), cfg)
    assert m.identity_reg(p, cfg).item() == 0
    p["T1"] = p["T1"] + 0.1
    assert m.identity_reg(p, cfg).item() > 0
