"""The serving-path predictor: embeddings -> adapter, on a real tiny diffusers pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hypernet.predict import Predictor
from pipeline_data.recipe import BuildConfig
from tests.utils.tiny_pipes import tiny_sd15_pipe
from weights.apply import apply_adapter, restore
from weights.methods import get_method, method_config


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd15_pipe()


def max_delta(pipe, adapter) -> float:
    m, cfg = get_method(adapter.spec.method), method_config(adapter.spec)
    return max(
        float(m.delta(pipe.unet.get_submodule(lay.name).weight, adapter.layer_params(lay.name), cfg).abs().max())
        for lay in adapter.spec.layers
    )


@pytest.mark.parametrize("method", ["lora", "svfit", "loldu", "dora"])
def test_untrained_predictor_is_a_noop(pipe, method: str) -> None:
    p = Predictor.untrained(pipe, BuildConfig(method=method, targets=["to_q", "to_k", "to_v", "to_out.0"]))
    a = p.predict(np.random.default_rng(0).normal(size=(3, 128)).astype(np.float32), steps=4)
    assert a.spec.method == method and len(a.spec.layers) > 0
    assert max_delta(pipe, a) < 1e-6
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    state = apply_adapter(pipe.unet, a)
    restore(pipe.unet, state)
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())


@pytest.mark.parametrize("kind", ["linear", "transformer"])
def test_untrained_predictor_takes_preset_settings(pipe, kind: str) -> None:
    p = Predictor.untrained(pipe, settings=[f"autoencoder.kind={kind}", "sampling.steps=2"])
    assert p.hypernet.config.autoencoder.kind == kind and p.steps == 2
    assert max_delta(pipe, p.predict(np.ones((2, 128), np.float32))) < 1e-6  # still the no-op init adapter
    with pytest.raises(ValueError, match="unknown hypernet setting"):
        Predictor.untrained(pipe, settings=["autoencoder.colour=red"])


def test_predictor_save_load_roundtrip_and_batching(pipe, tmp_path) -> None:
    p = Predictor.untrained(pipe)
    # give the (fresh) hypernet a non-trivial output so the round trip is meaningful: the tiny preset's linear
    # autoencoder decodes through its (unfitted, zero) basis
    p.hypernet.model.token_std.fill_(0.01)
    ae = p.hypernet.model.autoencoder
    ae.basis = torch.randn(ae.basis.shape, generator=torch.Generator().manual_seed(0)).half()
    emb = [np.random.default_rng(i).normal(size=(i + 1, 128)).astype(np.float32) for i in range(3)]
    a = p.predict_batch(emb, seed=3, steps=4)
    p.save(tmp_path / "ckpt")
    q = Predictor.load(tmp_path / "ckpt")
    b = q.predict_batch(emb, seed=3, steps=4)
    for x, y in zip(a, b):
        assert x.tensors.keys() == y.tensors.keys()
        for k in x.tensors:
            torch.testing.assert_close(x.tensors[k], y.tensors[k])
    single = q.predict(emb[1], seed=3, steps=4)
    for k in single.tensors:
        torch.testing.assert_close(single.tensors[k], b[1].tensors[k], atol=1e-5, rtol=1e-4)
    assert max_delta(pipe, b[0]) > 0


@pytest.mark.parametrize(
    "emb, match",
    [
        (np.zeros((2, 512), np.float32), "face embeddings must be"),
        (np.full((2, 128), np.nan, np.float32), "NaN"),
        (np.zeros((0, 128), np.float32), "face embeddings must be"),
    ],
)
def test_bad_embeddings_are_refused(pipe, emb, match: str) -> None:
    p = Predictor.untrained(pipe, BuildConfig(targets=["to_q"]))
    with pytest.raises(ValueError, match=match):
        p.predict(emb)


def test_missing_checkpoint_files_name_the_directory(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="is not a hypernetwork checkpoint"):
        Predictor.load(tmp_path)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"steps": 0}, "sampling steps must be >= 1, got 0"),  # was: silently the checkpoint's steps
        ({"steps": -2}, "sampling steps must be >= 1"),
        ({"cfg_scale": float("nan")}, "cfg_scale must be a finite number"),
        ({"seed": -1}, "seed must be in 0 .. "),
        ({"seed": 2**70}, "seed must be in 0 .. "),
        ({"samples": 0}, "samples must be >= 1"),
    ],
)
def test_predictor_refuses_bad_sampling_options(pipe, kw, message) -> None:
    p = Predictor.untrained(pipe, BuildConfig(targets=["to_q"]))
    with pytest.raises(ValueError, match=message):
        p.predict(np.zeros((1, 128), np.float32) + 0.1, **kw)


# ---- sampling settings: their own file beside the checkpoint ------------------------------------------------------


def test_shipped_tiny_hypernet_samples_as_it_was_tuned() -> None:
    """assets/tiny/hypernet predicts with the option `hypernet tune` chose (tuning.json): 1 DDIM step at CFG 5."""
    import json

    from service.settings import TINY_HYPERNET

    if not (TINY_HYPERNET / "sampling.json").is_file():
        pytest.skip("no bundled tiny hypernet (make tiny-assets)")
    chosen = json.loads((TINY_HYPERNET / "tuning.json").read_text())["chosen"]
    p = Predictor.load(TINY_HYPERNET)
    assert (p.steps, p.cfg_scale, p.samples) == (chosen["sample_steps"], chosen["cfg_scale"], chosen["samples"])
    assert (p.steps, p.cfg_scale, p.samples) == (1, 5.0, 1)
    rng = np.random.default_rng(0)
    embs = [rng.normal(size=(k, p.cond_dim)).astype(np.float32) for k in (1, 3)]
    got = p.predict_batch(embs)
    explicit = p.predict_batch(embs, steps=1, cfg_scale=5.0, samples=1)
    other = p.predict_batch(embs, cfg_scale=1.0)
    for a, b, c in zip(got, explicit, other):
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
        assert any(not torch.equal(a.tensors[k], c.tensors[k]) for k in a.tensors)  # the setting matters


def test_sampling_json_and_checkpoints_from_before_it(pipe, tmp_path) -> None:
    import json

    from hypernet.checkpoint import load_config
    from hypernet.config import SamplingConfig

    d = tmp_path / "ck"
    Predictor.untrained(pipe, settings=["sampling.steps=3", "sampling.cfg_scale=2"]).save(d)
    assert json.loads((d / "sampling.json").read_text()) == {"steps": 3, "cfg_scale": 2.0, "samples": 1}
    assert "cfg_scale" not in json.loads((d / "config.json").read_text())["train"]
    assert Predictor.load(d).steps == 3 and Predictor.load(d).cfg_scale == 2.0
    # a checkpoint written before sampling.json: its train.sample_* fields are its sampling settings
    cfg = json.loads((d / "config.json").read_text())
    cfg["train"] |= {"sample_steps": 1, "cfg_scale": 5.0, "sample_count": 2}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="sampling settings live in sampling.json now"):  # both: refused
        load_config(d)
    (d / "sampling.json").unlink()
    assert load_config(d).sampling == SamplingConfig(steps=1, cfg_scale=5.0, samples=2)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            ["autoencoder.kind=linear", "autoencoder.hidden=128"],
            "autoencoder.hidden has no effect with autoencoder.kind=linear",
        ),
        (["autoencoder.kind=linear", "train.ae_steps=5", "autoencoder.latent_noise=0.1"], "have no effect"),
        (["autoencoder.kind=transformer", "autoencoder.ridge=3"], "autoencoder.ridge has no effect"),
    ],
)
def test_knobs_the_autoencoder_kind_ignores_are_refused(pipe, settings, message) -> None:
    with pytest.raises(ValueError, match=message):
        Predictor.untrained(pipe, settings=settings)
