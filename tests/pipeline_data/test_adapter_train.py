"""One identity's adapter training on a real tiny diffusers pipeline: timings, losses, an untouched UNet."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline_data.adapter_train import train_identity
from pipeline_data.recipe import ATTN_TARGETS, BuildConfig
from tests.utils.tiny_pipes import tiny_sd15_pipe


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_train_identity_reports_each_step_and_leaves_the_unet_as_it_was(method: str) -> None:
    pipe = tiny_sd15_pipe()
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    crops = np.random.default_rng(0).integers(0, 256, size=(3, size, size, 3), dtype=np.uint8)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    cfg = BuildConfig(method=method, targets=ATTN_TARGETS, steps=4, batch_size=2, lr=1e-2)
    res = train_identity(pipe, crops, cfg, base_model="tiny-test")
    assert len(res.losses) == len(res.step_seconds) == 4 and all(np.isfinite(res.losses))
    assert all(s > 0 for s in res.step_seconds) and sum(res.step_seconds) < res.seconds
    assert res.adapter.spec.method == method and res.adapter.spec.base_model == "tiny-test"
    assert pipe.unet.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())
    trained = [t for name, t in res.adapter.tensors.items() if name.endswith("::B")]
    assert trained and any(float(t.abs().max()) > 0 for t in trained)  # B starts at zero: the steps moved it


def test_a_failing_identity_does_not_poison_the_next_one() -> None:
    """Training that fails after the adapter was injected removes it: the next identity trains as on a fresh UNet."""
    from weights.inject import adapted_layers

    pipe = tiny_sd15_pipe()
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    rng = np.random.default_rng(0)
    crops_a, crops_b = (rng.integers(0, 256, size=(3, size, size, 3), dtype=np.uint8) for _ in range(2))
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    grads = {k: p.requires_grad for k, p in pipe.unet.named_parameters()}
    good = BuildConfig(targets=ATTN_TARGETS, steps=3, batch_size=2, lr=1e-2)
    bad = BuildConfig(targets=ATTN_TARGETS, steps=3, batch_size=2, lr=1e-2)
    bad.lr = float("nan")  # a library caller bypassing the recipe checks: the optimizer refuses it after injection
    with pytest.raises(ValueError, match="learning rate"):
        train_identity(pipe, crops_a, bad, base_model="tiny-test")
    assert not adapted_layers(pipe.unet)
    assert pipe.unet.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())
    assert {k: p.requires_grad for k, p in pipe.unet.named_parameters()} == grads
    after_failure = train_identity(pipe, crops_b, good, base_model="tiny-test")
    fresh = train_identity(tiny_sd15_pipe(), crops_b, good, base_model="tiny-test")
    assert after_failure.adapter.tensors.keys() == fresh.adapter.tensors.keys()
    for k, t in fresh.adapter.tensors.items():
        torch.testing.assert_close(after_failure.adapter.tensors[k], t)


def test_init_and_on_step() -> None:
    """``init`` starts from a given adapter (a prediction), ``on_step`` sees every step and can stop the training
    (the UNet is left as it was)."""
    pipe = tiny_sd15_pipe()
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    crops = np.random.default_rng(1).integers(0, 256, size=(2, size, size, 3), dtype=np.uint8)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    cfg = BuildConfig(targets=ATTN_TARGETS, steps=2, batch_size=2, lr=1e-2)
    seen: list[tuple[int, float]] = []
    first = train_identity(pipe, crops, cfg, base_model="tiny", on_step=lambda s, loss: seen.append((s, loss)))
    assert [s for s, _ in seen] == [0, 1] and [x for _, x in seen] == first.losses and all(np.isfinite(first.losses))
    # started from the first run's adapter, a step at a vanishing learning rate stays where that one ended
    again = train_identity(pipe, crops, BuildConfig(targets=ATTN_TARGETS, steps=1, batch_size=2, lr=1e-9),
                           base_model="tiny", init=first.adapter)  # fmt: skip
    for k, t in first.adapter.tensors.items():
        torch.testing.assert_close(again.adapter.tensors[k], t, atol=1e-6, rtol=1e-4)  # lr ~0: it stays at init

    def stop(step: int, loss: float) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_identity(pipe, crops, cfg, base_model="tiny", on_step=stop)
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())
    with pytest.raises(ValueError, match="the initial adapter is lora rank 4, the recipe trains lora rank 2"):
        train_identity(
            pipe, crops, BuildConfig(targets=ATTN_TARGETS, rank=2, steps=1), base_model="t", init=first.adapter
        )
