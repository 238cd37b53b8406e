"""Per-sample LoRA adapters in one forward equal merging each sample's adapter alone (tiny SD 1.5 UNet/pipeline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline_data.recipe import FULL_TARGETS
from tests.utils.adapters import make_adapter
from tests.utils.tiny_pipes import TEXT_DIM, tiny_sd15_pipe, tiny_sd15_unet
from weights.apply import apply_adapter, restore
from weights.per_sample import PerSampleLoRA, batch_rows, per_sample_adapters, stack_adapters


def unet_inputs(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 16, 16, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    ctx = torch.randn(n, 7, TEXT_DIM, generator=g)
    return x, t, ctx


@pytest.fixture(scope="module")
def unet():
    return tiny_sd15_unet().eval()


@pytest.fixture(scope="module")
def adapters(unet):
    # different ranks and alphas; the recipe's targets: attention and ff (Linear), proj_in/out (1x1 convs in this
    # UNet), resnet conv1/conv2 (3x3 convs); the third adapter targets attention only
    return [
        make_adapter(unet, "lora", rank=4, targets=FULL_TARGETS, seed=1, noise=0.5),
        make_adapter(unet, "lora", rank=2, targets=FULL_TARGETS, seed=2, noise=0.5, alpha=4.0),
        make_adapter(unet, "lora", rank=4, targets=FULL_TARGETS[:4], seed=3, noise=0.5),
    ]


def merged_alone(unet, adapter, scale, x, t, ctx):
    with torch.no_grad():
        if adapter is None:
            return unet(x, t, encoder_hidden_states=ctx).sample
        state = apply_adapter(unet, adapter, scale)
        try:
            return unet(x, t, encoder_hidden_states=ctx).sample
        finally:
            restore(unet, state)


def test_the_targets_include_linear_and_3x3_conv_layers(adapters) -> None:
    kinds = {lay.kind for lay in adapters[0].spec.layers}
    assert kinds == {"linear", "conv"}
    assert any(len(lay.shape) == 4 and lay.shape[2:] == (3, 3) for lay in adapters[0].spec.layers)


@pytest.mark.parametrize(
    "rows, scales",
    [
        ([0, 1, 2], [1.0, 1.0, 1.0]),  # row i -> adapter i
        ([2, -1, 0, 1, 0], [1.0, 0.5, 2.0]),  # a base-model row, a repeated adapter, user scales
        ([1, 1], [1.0, 0.7, 1.0]),  # one adapter for every row
    ],
)
def test_per_sample_forward_equals_merging_each_adapter_alone(unet, adapters, rows, scales) -> None:
    x, t, ctx = unet_inputs(len(rows))
    ps = stack_adapters(adapters, scales)
    with torch.no_grad(), per_sample_adapters(unet, ps, rows):
        out = unet(x, t, encoder_hidden_states=ctx).sample
    for i, a in enumerate(rows):
        ref = merged_alone(unet, None if a < 0 else adapters[a], scales[a], x[i : i + 1], t[i : i + 1], ctx[i : i + 1])
        torch.testing.assert_close(out[i : i + 1], ref, atol=1e-5, rtol=0)
    # the adapters mattered, and the block left no hooks behind
    with torch.no_grad():
        base = unet(x, t, encoder_hidden_states=ctx).sample
    assert float((out - base).abs().max()) > 1e-2
    assert all(not m._forward_hooks for m in unet.modules())


def test_none_adapter_rows_are_the_base_model(unet, adapters) -> None:
    x, t, ctx = unet_inputs(2, seed=1)
    ps = stack_adapters([None, adapters[0]])
    with torch.no_grad(), per_sample_adapters(unet, ps):
        out = unet(x, t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(out[:1], merged_alone(unet, None, 1.0, x[:1], t[:1], ctx[:1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1:], merged_alone(unet, adapters[0], 1.0, x[1:], t[1:], ctx[1:]), atol=1e-5, rtol=0)


def test_gradients_reach_the_factors_and_never_the_frozen_unet(unet, adapters) -> None:
    x, t, ctx = unet_inputs(3, seed=2)
    ps = stack_adapters(adapters)
    down = {k: v.clone().requires_grad_(True) for k, v in ps.down.items()}
    up = {k: v.clone().requires_grad_(True) for k, v in ps.up.items()}
    scale = ps.scale.clone().requires_grad_(True)
    some = next(iter(unet.parameters()))
    some.requires_grad_(True)  # a caller's flag: frozen inside the block, restored after
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    with per_sample_adapters(unet, PerSampleLoRA(down, up, scale)):
        loss = unet(x, t, encoder_hidden_states=ctx).sample.pow(2).mean()
    loss.backward()
    assert all(p.grad is None for p in unet.parameters())
    assert {n: p.requires_grad for n, p in unet.named_parameters()} == flags
    some.requires_grad_(False)
    assert scale.grad is not None and bool((scale.grad != 0).all())
    for name in ps.layers:
        assert up[name].grad is not None and down[name].grad is not None
    # adapter 2 targets attention only: the other layers' factors of row 2 get zero gradient, its attention ones not
    conv = next(n for n in ps.layers if n.endswith("conv1"))
    attn = next(n for n in ps.layers if n.endswith("to_q"))
    assert float(up[conv].grad[2].abs().max()) == 0.0 and float(up[attn].grad[2].abs().max()) > 0
    assert float(up[conv].grad[0].abs().max()) > 0


def test_gradient_matches_the_merged_adapter_gradient(unet, adapters) -> None:
    """d loss / d B of row 0 equals the gradient of the same loss through the merged weights (W + s B A)."""
    from weights.inject import adapted_layers, inject_adapter, remove_adapter

    x, t, ctx = unet_inputs(1, seed=3)
    ad = adapters[0]
    inject_adapter(unet, ad.spec, adapter=ad)
    try:
        unet(x, t, encoder_hidden_states=ctx).sample.pow(2).mean().backward()
        ref = {n: w.adapter.B.grad.clone() for n, w in adapted_layers(unet).items()}
    finally:
        remove_adapter(unet)
    ps = stack_adapters([ad])
    up = {k: v.clone().requires_grad_(True) for k, v in ps.up.items()}
    with per_sample_adapters(unet, PerSampleLoRA(ps.down, up, ps.scale)):
        unet(x, t, encoder_hidden_states=ctx).sample.pow(2).mean().backward()
    for name, g in ref.items():
        torch.testing.assert_close(up[name].grad[0], g, atol=1e-6, rtol=1e-4)


def test_shared_down_projection_equals_per_sample_copies(unet, adapters) -> None:
    x, t, ctx = unet_inputs(3, seed=4)
    ps = stack_adapters([adapters[0]] * 3)
    g = torch.Generator().manual_seed(5)
    up = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in ps.up.items()}
    shared = PerSampleLoRA({k: v[0] for k, v in ps.down.items()}, up, ps.scale)  # (r, n) shared
    copies = PerSampleLoRA(ps.down, up, ps.scale)  # (S, r, n)
    with torch.no_grad():
        with per_sample_adapters(unet, shared):
            a = unet(x, t, encoder_hidden_states=ctx).sample
        with per_sample_adapters(unet, copies):
            b = unet(x, t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_pipeline_batch_of_three_identities_equals_each_generated_alone() -> None:
    """A real StableDiffusionPipeline call with CFG (2B UNet rows): batched per-sample == each prompt merged alone."""
    pipe = tiny_sd15_pipe()
    ads = [make_adapter(pipe.unet, "lora", targets=FULL_TARGETS, seed=s, noise=0.5) for s in (11, 12, 13)]
    prompts = ["a photo of sks person", "a photo of the person", "a photo"]
    kw = {"num_inference_steps": 3, "guidance_scale": 5.0, "height": 32, "width": 32, "output_type": "np"}
    gens = [torch.Generator().manual_seed(s) for s in (0, 1, 2)]
    with per_sample_adapters(pipe.unet, stack_adapters(ads), batch_rows([0, 1, 2], cfg=True)):
        batch = pipe(prompts, generator=gens, **kw).images
    alone = []
    for ad, prompt, s in zip(ads, prompts, (0, 1, 2), strict=True):
        state = apply_adapter(pipe.unet, ad)
        try:
            alone.append(pipe(prompt, generator=torch.Generator().manual_seed(s), **kw).images[0])
        finally:
            restore(pipe.unet, state)
    base = pipe(prompts[0], generator=torch.Generator().manual_seed(0), **kw).images[0]
    np.testing.assert_allclose(batch, np.stack(alone), atol=1e-4, rtol=0)
    assert float(np.abs(alone[0] - base).max()) > 1e-2  # the adapters do change the images


def test_batch_rows_maps_pipeline_rows() -> None:
    assert batch_rows([0, -1, 2]).tolist() == [0, -1, 2]
    assert batch_rows([0, 1], images_per_prompt=2, cfg=True).tolist() == [0, 0, 1, 1, 0, 0, 1, 1]


@pytest.mark.parametrize(
    "rows, n, match",
    [
        ([0, 1], 3, "batch has 3 rows but the adapters map 2"),
        ([0, 5], 2, r"adapter indices in \[-1, 2\]"),
        (None, 4, "batch has 4 rows but the adapters map 3"),
    ],
)
def test_bad_row_maps_are_clear_errors(unet, adapters, rows, n, match) -> None:
    x, t, ctx = unet_inputs(n)
    with pytest.raises(ValueError, match=match), torch.no_grad():
        with per_sample_adapters(unet, stack_adapters(adapters), rows):
            unet(x, t, encoder_hidden_states=ctx)
    assert not unet._forward_hooks and all(not m._forward_hooks for m in unet.modules())


def test_bad_adapters_are_clear_errors(unet, adapters) -> None:
    with pytest.raises(ValueError, match="method 'dora'"):
        stack_adapters([make_adapter(unet, "dora")])
    ps = stack_adapters(adapters[:1])
    wrong = PerSampleLoRA({"nope": ps.down[ps.layers[0]]}, {"nope": ps.up[ps.layers[0]]}, ps.scale)
    with pytest.raises(ValueError, match="'nope' is missing"), per_sample_adapters(unet, wrong):
        pass
    with per_sample_adapters(unet, ps):
        with pytest.raises(ValueError, match="already has per-sample adapters"), per_sample_adapters(unet, ps):
            pass
