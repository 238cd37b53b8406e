"""Autoencoder and denoiser: shapes, zero-init, condition padding, CFG, config validation."""

from __future__ import annotations

import pytest
import torch

from hypernet.autoencoder import magnitude_weight, reconstruction_loss
from hypernet.config import AutoencoderConfig, DenoiserConfig, HypernetConfig, TrainConfig, get_preset
from hypernet.data import HypernetDataset, pad_conditions
from tests.hypernet._factories import randomize_zero_inits, tiny_config, tiny_data, tiny_model


@pytest.fixture(scope="module")
def data() -> HypernetDataset:
    return tiny_data(24)


@pytest.mark.parametrize(("latent_tokens", "latent_dim"), [(1, 4), (4, 8), (16, 3)])
def test_autoencoder_shapes(data, latent_tokens, latent_dim):
    cfg = tiny_config()
    cfg.autoencoder = AutoencoderConfig(hidden=32, heads=2, depth_enc=1, depth_dec=1, latent_tokens=latent_tokens,
                                        latent_dim=latent_dim)  # fmt: skip
    model = tiny_model(data, cfg)
    x = model.normalize_tokens(data.tokens[:5])  # (5, T, D)
    z = model.autoencoder.encode(x)
    assert z.shape == (5, latent_tokens, latent_dim)
    assert torch.allclose(z.pow(2).mean(-1), torch.ones(5, latent_tokens), atol=1e-3)  # unit RMS per latent token
    assert model.autoencoder.decode(z).shape == x.shape
    assert model.decode_raw(model.encode_raw(data.tokens[:5])).shape == (5, data.num_tokens, data.token_dim)


def test_decoded_padding_is_exactly_zero(data):
    model = tiny_model(data)
    out = model.decode_raw(torch.randn(3, 4, 8))  # (3, T, D)
    assert not data.mask.all()  # the synthetic layout has padded entries
    assert torch.equal(out[:, ~data.mask], torch.zeros_like(out[:, ~data.mask]))


def test_reconstruction_loss_weights_and_mask():
    target = torch.zeros(1, 2, 2)
    pred = torch.tensor([[[1.0, 1.0], [1.0, 100.0]]])
    mask = torch.tensor([[True, True], [True, False]])
    # the masked entry (error 100) is ignored; the entry with weight 3 counts three times
    w = torch.tensor([[[1.0, 1.0], [3.0, 1.0]]])
    assert reconstruction_loss(pred, target, w, mask).item() == pytest.approx(1.0)
    assert torch.equal(magnitude_weight(torch.tensor([-2.0, 0.0]), 2.0, 1.0), torch.tensor([2.0, 1.0]))


def test_untrained_denoiser_outputs_exactly_zero(data):
    model = tiny_model(data)
    cond, mask = pad_conditions(data.cond[:4])
    out = model.denoiser(torch.randn(4, 4, 8), torch.tensor([0, 10, 500, 999]), cond, mask)
    assert out.shape == (4, 4, 8)
    assert torch.equal(out, torch.zeros_like(out))


def test_variable_photo_count_padding_matches_unpadded(data):
    model = tiny_model(data)
    randomize_zero_inits(model)
    conds = [data.cond[0][:1], data.cond[1][:3], data.cond[2][:2]]  # 1, 3 and 2 photos
    x, t = torch.randn(3, 4, 8), torch.tensor([5, 300, 900])
    cond, mask = pad_conditions(conds)  # (3, 3, E)
    batched = model.denoiser(x, t, cond, mask)
    for i, c in enumerate(conds):
        alone = model.denoiser(x[i : i + 1], t[i : i + 1], c[None], torch.ones(1, c.shape[0], dtype=torch.bool))
        torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batched[0], batched[1])  # the outputs do depend on the photos


def test_photo_order_does_not_matter(data):
    model = tiny_model(data)
    randomize_zero_inits(model)
    c = data.cond[3]  # (P, E)
    x, t, m = torch.randn(1, 4, 8), torch.tensor([200]), torch.ones(1, c.shape[0], dtype=torch.bool)
    torch.testing.assert_close(model.denoiser(x, t, c[None], m), model.denoiser(x, t, c.flip(0)[None], m))


def test_null_condition_ignores_photos(data):
    model = tiny_model(data)
    randomize_zero_inits(model)
    x, t, drop = torch.randn(2, 4, 8), torch.tensor([100, 100]), torch.ones(2, dtype=torch.bool)
    a = model.denoiser(x, t, *pad_conditions([data.cond[0], data.cond[1]]), drop=drop)
    b = model.denoiser(x, t, *pad_conditions([data.cond[5], data.cond[6][:1]]), drop=drop)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_cfg_combination(data, scale):
    model = tiny_model(data)
    randomize_zero_inits(model)
    cond, mask = pad_conditions(data.cond[:3])
    x, t = torch.randn(3, 4, 8), torch.tensor([1, 400, 999])
    cond_out = model.denoiser(x, t, cond, mask)
    uncond_out = model.denoiser(x, t, cond, mask, drop=torch.ones(3, dtype=torch.bool))
    guided = model.denoiser.forward_with_cfg(x, t, cond, mask, scale)
    torch.testing.assert_close(guided, uncond_out + scale * (cond_out - uncond_out), atol=1e-5, rtol=1e-5)
    if scale == 1.0:  # CFG scale 1 is exactly the conditional prediction
        torch.testing.assert_close(guided, cond_out, atol=1e-5, rtol=1e-5)


def test_condition_without_any_photo_is_rejected(data):
    model = tiny_model(data)
    cond, mask = pad_conditions(data.cond[:2])
    mask[1] = False
    with pytest.raises(ValueError, match="at least one condition"):
        model.denoiser(torch.randn(2, 4, 8), torch.tensor([1, 2]), cond, mask)


# ---------------------------------------------------------------- config and dataset validation


@pytest.mark.parametrize("name", ["tiny", "sd15", "sdxl"])
def test_presets_round_trip_through_dict(name):
    cfg = get_preset(name)
    assert HypernetConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("factory", "kwargs", "match"),
    [
        (AutoencoderConfig, {"hidden": 30, "heads": 4}, "divisible"),
        (AutoencoderConfig, {"latent_tokens": 0}, "latent_tokens"),
        (DenoiserConfig, {"schedule": "sqrt"}, "schedule"),
        (DenoiserConfig, {"prediction": "x0"}, "prediction"),
        (DenoiserConfig, {"cond_drop_prob": 1.0}, "cond_drop_prob"),
        (TrainConfig, {"amp": "fp8"}, "amp"),
        (TrainConfig, {"batch_size": 0}, "batch_size"),
        (get_preset, {"name": "huge"}, "huge"),
    ],
)
def test_bad_config_values_raise(factory, kwargs, match):
    with pytest.raises(ValueError, match=match):
        factory(**kwargs)


def test_linear_latent_larger_than_the_condition_is_refused_at_config_time() -> None:
    """The sd15 preset's 64 x 32 latent with the linear kind would allocate a 15 GB basis before failing."""
    with pytest.raises(ValueError, match="at most cond_dim=512 latent directions.*64 x 32 = 2048"):
        get_preset("sd15").with_overrides(["autoencoder.kind=linear"])
    cfg = get_preset("sd15").with_overrides(["autoencoder.kind=linear", "autoencoder.latent_dim=8"])  # 512: fits
    with pytest.raises(ValueError, match="cond_dim=128"):
        cfg.for_data(num_tokens=10, token_dim=8, num_layers=2, cond_dim=128)  # a dlib dataset: 128 dims
    assert get_preset("tiny").for_data(10, 8, 2, 128).autoencoder.kind == "linear"  # 8 x 4 = 32 <= 128


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"tokens": torch.zeros(4, 3)}, "tokens must be"),
        ({"cond": [torch.zeros(2, 8)] * 3}, "condition sets"),
        ({"cond": [torch.zeros(0, 8)] * 4}, "P_i >= 1"),
        ({"names": ["a", "a", "b", "c"]}, "unique"),
        ({"tokens": torch.full((4, 3, 5), float("nan"))}, "NaN"),
        ({"mask": torch.ones(2, 5, dtype=torch.bool)}, "mask"),
    ],
)
def test_bad_dataset_raises(change, match):
    kw = {"tokens": torch.zeros(4, 3, 5), "cond": [torch.zeros(2, 8)] * 4, "names": list("abcd")} | change
    with pytest.raises(ValueError, match=match):
        HypernetDataset.from_tensors(**kw)


def test_split_is_by_identity_and_reproducible(data):
    a, b = data.split(0.25, seed=3)
    assert set(a.names).isdisjoint(b.names) and len(a) + len(b) == len(data)
    assert data.split(0.25, seed=3)[1].names == b.names
    i = data.names.index(b.names[0])
    assert torch.equal(b.tokens[0], data.tokens[i]) and torch.equal(b.cond[0], data.cond[i])


def test_tiny_preset_is_the_shipped_tiny_hypernet() -> None:
    """`difflora hypernet train --dataset DIR --token-dim 512` with no --set trains the bundled checkpoint's model."""
    import json
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[2] / "assets" / "tiny" / "hypernet" / "config.json"
    if not shipped.is_file():
        pytest.skip("no bundled tiny hypernet (make tiny-assets)")
    sections = ("autoencoder", "denoiser", "train")
    saved = HypernetConfig.from_dict({k: v for k, v in json.loads(shipped.read_text()).items() if k in sections})
    cfg = get_preset("tiny").for_data(
        saved.autoencoder.num_tokens, saved.autoencoder.token_dim, saved.autoencoder.num_layers,
        saved.denoiser.cond_dim,
    )  # fmt: skip
    assert cfg.autoencoder == saved.autoencoder and cfg.denoiser == saved.denoiser
    # the trainer zeroes ae_steps for the linear kind (`hypernet tune` chooses sampling.json, not config.json)
    tuned = {"ae_steps"}
    assert {k: v for k, v in cfg.train.__dict__.items() if k not in tuned} == {
        k: v for k, v in saved.train.__dict__.items() if k not in tuned
    }
