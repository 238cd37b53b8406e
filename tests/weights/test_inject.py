"""Training-time injection: wrapped forward == merged weights, grads, round-trips, peft parity, tiny UNet."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from weights.adapter import Adapter
from weights.inject import (
    AdaptedLayer,
    adapted_layers,
    extract_adapter,
    inject_adapter,
    remove_adapter,
    set_adapter_enabled,
    trainable_parameters,
)
from weights.methods import METHODS, get_method, method_config
from weights.spec import AdapterSpec

torch.set_num_threads(1)

NAMES = sorted(METHODS)
ALPHA = {"lora": 8.0, "dora": 8.0, "loldu": 2.0}  # scale = alpha / rank != 1 where the method uses it


class ToyBlock(nn.Module):
    """Small real block: 1x1 conv in, 3x3 conv, attention-style linears (incl. a ModuleList ``to_out.0``)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj_in = nn.Conv2d(4, 8, 1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.to_q, self.to_k = nn.Linear(8, 8), nn.Linear(8, 8, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(8, 6)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv1(self.proj_in(x)))  # (B, 8, H, W)
        t = h.flatten(2).transpose(1, 2)  # (B, HW, 8)
        return self.to_out[0](self.to_q(t) * torch.tanh(self.to_k(t)))  # (B, HW, 6)


def targets_for(name: str) -> list[str]:
    m = METHODS[name]
    t = ["to_q", "to_k", "to_out.0"]
    if m.supports_conv:
        t += ["proj_in"] + ([] if m.conv_1x1_only else ["conv1"])
    return t


def make(name: str, seed: int = 0) -> tuple[ToyBlock, ToyBlock, AdapterSpec]:
    torch.manual_seed(seed)
    base = ToyBlock()
    model = copy.deepcopy(base)
    spec = AdapterSpec(method=name, rank=2, alpha=ALPHA.get(name), targets=targets_for(name))
    spec = inject_adapter(model, spec, generator=torch.Generator().manual_seed(seed))
    return base, model, spec


@torch.no_grad()
def perturb(model: nn.Module, std: float = 0.2) -> None:
    """Move every trainable tensor off its init: at init some factors get zero gradient by construction
    (LoRA A while B = 0, HTA v_l/v_r while d = 0, ARC D while c = 0, TLoRA cores while P0 = 0)."""
    g = torch.Generator().manual_seed(123)
    for prm in trainable_parameters(model):
        prm.add_(std * torch.randn(prm.shape, generator=g))


@torch.no_grad()
def merged_copy(base: nn.Module, adapter: Adapter) -> nn.Module:
    """A copy of the base model with W + ΔW and b + Δb written in (reference for the wrapped forward)."""
    merged, method, cfg = copy.deepcopy(base), get_method(adapter.spec.method), method_config(adapter.spec)
    for lay in adapter.spec.layers:
        mod = merged.get_submodule(lay.name)
        p = adapter.layer_params(lay.name)
        key = method.shared_key(lay.shape, cfg)
        if key is not None:
            p.update(adapter.shared_params(key))
        W = mod.weight.detach().clone()
        mod.weight += method.delta(W, p, cfg)
        db = method.bias_delta(W, p, cfg)
        if db is not None:  # ARC moves the bias; a bias-less layer (to_k) gets one
            mod.bias = nn.Parameter(db if mod.bias is None else mod.bias + db)
    return merged


X = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("name", NAMES)
def test_zero_init_and_merged_forward(name):
    base, model, spec = make(name)
    assert [lay.name for lay in spec.layers] == list(adapted_layers(model))  # module order
    with torch.no_grad():
        same = torch.allclose(model(X), base(X), atol=1e-5)
    assert same == METHODS[name].zero_init  # SNELL: the documented ΔW != 0 at init
    perturb(model)
    with torch.no_grad():
        out = model(X)
        ref = merged_copy(base, extract_adapter(model))(X)
    assert not torch.allclose(out, base(X), atol=1e-4)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_grads_reach_only_trainable(name):
    base, model, spec = make(name)
    perturb(model)  # see perturb(): otherwise some trainable factors have zero grad at step 0 by design
    model(X).square().mean().backward()
    method = METHODS[name]
    trainable = set(method.trainable) | set(method.shared_trainable())
    for lname, w in adapted_layers(model).items():
        assert w.weight.grad is None and (w.bias is None or w.bias.grad is None), lname
        for k, prm in w.adapter.named_parameters():
            assert k in trainable and prm.grad is not None and prm.grad.abs().sum() > 0, (lname, k)
        for k, buf in w.adapter.named_buffers():
            assert k not in trainable and not buf.requires_grad, (lname, k)
    for pname, prm in model.named_parameters():
        if ".adapter." not in pname:
            assert prm.grad is None and not prm.requires_grad, pname
    cfg = method_config(spec)
    expected = sum(method.num_trainable(lay.shape, cfg) for lay in spec.layers)
    groups = {k: s for k, s in ((method.shared_key(lay.shape, cfg), lay.shape) for lay in spec.layers) if k}
    expected += sum(method.init_shared(s, cfg)[k].numel() for s in groups.values() for k in method.shared_trainable())
    assert sum(p.numel() for p in trainable_parameters(model)) == expected


@pytest.mark.parametrize("name", NAMES)
def test_extract_remove_reinject_roundtrip(name):
    base, model, spec = make(name)
    originals = {n: model.get_submodule(n) for n in ("proj_in", "conv1", "to_q", "to_k", "to_out.0")}
    base_keys = set(base.state_dict())
    assert base_keys <= set(model.state_dict()), "base weight keys must survive injection"
    assert all(k in base_keys for k in model.state_dict() if ".adapter." not in k)
    perturb(model)
    with torch.no_grad():
        adapted = model(X)
    adapter = remove_adapter(model)
    assert not adapted_layers(model)
    for n, mod in originals.items():
        cur = model.get_submodule(n)
        assert not isinstance(cur, AdaptedLayer) and (cur is mod.base_layer if isinstance(mod, AdaptedLayer) else True)
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(X), base(X), atol=0, rtol=0)
    assert all(t.device.type == "cpu" and not t.requires_grad for t in adapter.tensors.values())
    inject_adapter(model, adapter.spec, adapter=adapter)
    with torch.no_grad():
        torch.testing.assert_close(model(X), adapted, atol=1e-6, rtol=1e-6)
        set_adapter_enabled(model, False)
        torch.testing.assert_close(model(X), base(X), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["svfit", "loldu", "lora"])
def test_inject_rebuilds_frozen_tensors(name):
    """An adapter holding only trainable tensors (as a hypernetwork predicts) gets its frozen ones from W."""
    base, model, spec = make(name)
    perturb(model)
    full = remove_adapter(model)
    method = METHODS[name]
    slim = Adapter(full.spec, {k: v for k, v in full.tensors.items() if k.split("::")[-1] in method.trainable})
    assert len(slim.tensors) < len(full.tensors) or not method.frozen
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    inject_adapter(a, spec, adapter=full)
    inject_adapter(b, spec, adapter=slim)
    with torch.no_grad():
        torch.testing.assert_close(a(X), b(X), atol=1e-5, rtol=1e-5)
    del slim.tensors[next(iter(slim.tensors))]
    victim = copy.deepcopy(base)
    with pytest.raises(ValueError, match="lacks trainable"):
        inject_adapter(victim, spec, adapter=slim)
    assert not adapted_layers(victim) and all(p.requires_grad for p in victim.parameters())  # untouched


@pytest.mark.parametrize("name", NAMES)
def test_bf16_base_fp32_adapter(name):
    """A bf16 base model with fp32 adapter params runs and stays close to the fp32 result."""
    base, model, spec = make(name)
    perturb(model)
    with torch.no_grad():
        ref = model(X)
        low = copy.deepcopy(base).to(torch.bfloat16)
        inject_adapter(low, spec, adapter=extract_adapter(model))
        out = low(X.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in trainable_parameters(low))
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)


def test_loldu_perm_stays_int64():
    _, model, _ = make("loldu")
    adapter = extract_adapter(model).to(dtype=torch.float16)
    assert adapter.tensors["to_q::perm"].dtype == torch.int64


def test_inject_errors():
    model = ToyBlock()
    with pytest.raises(ValueError, match="no module"):
        inject_adapter(model, AdapterSpec(targets=["nothing_here"]))
    with pytest.raises(TypeError, match="ModuleList"):
        inject_adapter(model, AdapterSpec(targets=["to_out"]))
    with pytest.raises(ValueError, match="1x1"):
        inject_adapter(model, AdapterSpec(method="arc", targets=["conv1"]))
    spec = inject_adapter(model, AdapterSpec(targets=["to_q"]))
    with pytest.raises(ValueError, match="already"):
        inject_adapter(model, spec)
    remove_adapter(model)
    with pytest.raises(ValueError, match="do not match"):
        inject_adapter(model, AdapterSpec(targets=["to_k"], layers=spec.layers))
    with pytest.raises(ValueError, match="no injected"):
        extract_adapter(model)


# ---- parity with peft's own LoRA / DoRA --------------------------------------------------------------------
@pytest.mark.parametrize("use_dora", [False, True])
def test_matches_peft(use_dora):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = ToyBlock()
    targets = ["to_q", "to_k", "to_out.0", "proj_in", "conv1"]
    ours = copy.deepcopy(base)
    spec = AdapterSpec(method="dora" if use_dora else "lora", rank=2, alpha=6.0, targets=targets)
    inject_adapter(ours, spec, generator=torch.Generator().manual_seed(0))
    perturb(ours)
    cfg = peft.LoraConfig(r=2, lora_alpha=6, target_modules=targets, init_lora_weights=False, use_dora=use_dora)
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for name, w in adapted_layers(ours).items():
            layer = theirs.base_model.model.get_submodule(name)
            A, B = w.adapter.A, w.adapter.B  # (r, n_flat), (m, r)
            layer.lora_A["default"].weight.copy_(A.reshape(layer.lora_A["default"].weight.shape))
            layer.lora_B["default"].weight.copy_(B.reshape(layer.lora_B["default"].weight.shape))
            if use_dora:
                mag = layer.lora_magnitude_vector["default"].weight
                mag.copy_(w.adapter.magnitude.reshape(mag.shape))
        torch.testing.assert_close(ours(X), theirs(X), atol=1e-5, rtol=1e-5)


# ---- a real diffusers UNet2DConditionModel built from config ----------------------------------------------
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


@pytest.fixture(scope="module")
def tiny_unet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
    ).eval()
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([10]), torch.randn(1, 5, 32, generator=g))
    with torch.no_grad():
        ref = unet(*inputs).sample
    return unet, inputs, ref


@pytest.mark.parametrize("name", NAMES)
def test_tiny_unet(name, tiny_unet):
    base, (x, t, ctx), ref = tiny_unet
    unet = copy.deepcopy(base)
    m = METHODS[name]
    targets = UNET_TARGETS + ([] if m.conv_1x1_only else ["conv1", "conv2"])
    spec = inject_adapter(unet, AdapterSpec(method=name, rank=2, targets=targets), generator=torch.Generator())
    kinds = {lay.kind for lay in spec.layers}
    assert kinds == {"linear", "conv"} and len(spec.layers) == len(adapted_layers(unet))
    names = [lay.name for lay in spec.layers]
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0" in names
    assert any(n.endswith("resnets.0.conv1") for n in names) != m.conv_1x1_only
    assert set(base.state_dict()) <= set(unet.state_dict())
    with torch.no_grad():
        out = unet(x, t, ctx).sample
    assert torch.allclose(out, ref, atol=1e-5) == m.zero_init
    if name == "lora":  # one backward through the real UNet reaches the adapter only
        perturb(unet)
        unet(x, t, ctx).sample.square().mean().backward()
        assert all(p.grad is not None for p in trainable_parameters(unet))
        assert all(p.grad is None for n, p in unet.named_parameters() if ".adapter." not in n)
    adapter = remove_adapter(unet)
    assert len({k.split("::")[0] for k in adapter.tensors if not k.startswith("shared::")}) == len(spec.layers)
    assert type(unet.get_submodule(names[0])) is type(base.get_submodule(names[0]))
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, ctx).sample, ref, atol=1e-6, rtol=1e-6)
