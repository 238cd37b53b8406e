"""Training: checkpoints (safetensors only), exact resume, autoencoder learning, and a synthetic run that must
beat the mean-adapter baseline on held-out identities."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hypernet.baselines import MeanAdapter
from hypernet.checkpoint import load_config
from hypernet.config import AutoencoderConfig, DenoiserConfig, HypernetConfig, SamplingConfig, TrainConfig
from hypernet.metrics import summarize, weight_metrics
from hypernet.sample import Hypernet
from hypernet.synthetic import SyntheticConfig, make_synthetic
from hypernet.train import Trainer, train
from tests.hypernet._factories import tiny_config, tiny_data


def _run_dir_files(d: Path) -> set[str]:
    return {p.name for p in d.iterdir()}


def test_checkpoint_files_and_reload(tmp_path):
    data = tiny_data(40)
    tr, va = data.split(0.25)
    final = train(tiny_config(), tr, tmp_path, val_set=va, device="cpu", progress=False)
    assert {"config.json", "model.safetensors", "ema.safetensors", "metrics.jsonl", "summary.json"} <= _run_dir_files(
        tmp_path
    )
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.pkl")) and not list(tmp_path.rglob("*.tmp"))
    ckpts = sorted((tmp_path / "checkpoints").glob("step_*"))
    assert [c.name for c in ckpts] == ["step_00000012", "step_00000014"]  # ckpt_every=4, keep 2, final at 14
    assert _run_dir_files(ckpts[-1]) >= {"optimizer.safetensors", "trainer_state.json", "ema.safetensors"}
    opt = load_file(ckpts[-1] / "optimizer.safetensors")
    assert "rng.train" in opt and any(k.endswith(".exp_avg_sq") for k in opt)
    # token statistics and layout travel with the weights
    ema = load_file(tmp_path / "ema.safetensors")
    assert torch.equal(ema["mask"], tr.mask) and torch.equal(ema["autoencoder.layer_ids"], tr.layer_ids)
    assert ema["token_mean"].shape == tr.tokens.shape[1:] and float(ema["latent_std"]) > 0
    assert load_config(tmp_path).autoencoder.num_tokens == tr.num_tokens
    # the inference class reproduces the trainer's own final evaluation
    hn = Hypernet.load(tmp_path, device="cpu")
    assert not hn.model.training
    pred = hn.predict_tokens(va.cond, steps=5)
    s = summarize(weight_metrics(pred, va.tokens, va.mask, hn.model.token_mean))
    assert s["rel_mse"] == pytest.approx(final["val_rel_mse"], rel=1e-4)
    recs = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "lr", "grad_norm"} <= set(recs[0]) and recs[-1]["stage"] == "final"
    assert (tmp_path / "metrics.png").stat().st_size > 1000


@pytest.mark.parametrize("stops", [[5, 10], [6], [9]])  # inside stage 1, at the stage switch, inside stage 2
def test_resume_matches_uninterrupted(tmp_path, stops):
    data = tiny_data(32)
    cfg = tiny_config(ae_steps=6, dn_steps=6)
    train(cfg, data, tmp_path / "straight", device="cpu", progress=False)
    for stop in stops:  # interrupted runs, each resumed from the latest checkpoint
        assert train(cfg, data, tmp_path / "resumed", device="cpu", progress=False, stop_after=stop) == {}
    train(cfg, data, tmp_path / "resumed", device="cpu", progress=False)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "resumed" / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
    lines = [(tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in ("straight", "resumed")]
    assert [json.loads(x)["step"] for x in lines[0]] == [json.loads(x)["step"] for x in lines[1]]


def test_resume_refuses_a_different_model(tmp_path):
    data = tiny_data(24)
    train(tiny_config(), data, tmp_path, device="cpu", progress=False, stop_after=4)
    cfg = tiny_config()
    cfg.denoiser = DenoiserConfig(hidden=64, depth=2, heads=2)
    with pytest.raises(ValueError, match="denoiser config differs"):
        train(cfg, data, tmp_path, device="cpu", progress=False)


def test_resume_refuses_other_identities(tmp_path):
    """A run continued on more (or other) identities would silently keep the old fit: it must be refused."""
    data = tiny_data(24)
    train(tiny_config(), data.subset(list(range(16))), tmp_path, device="cpu", progress=False, stop_after=4)
    with pytest.raises(ValueError, match="other identities"):
        train(tiny_config(), data, tmp_path, device="cpu", progress=False)
    train(tiny_config(), data.subset(list(range(16))), tmp_path, device="cpu", progress=False)  # same data resumes


def test_bf16_autocast_on_cpu_trains(tmp_path):
    data = tiny_data(24)
    out = train(tiny_config(ae_steps=3, dn_steps=3, amp="bf16"), data, tmp_path, device="cpu", progress=False)
    assert all(torch.isfinite(torch.tensor(v)) for v in out.values())


def test_autoencoder_reconstruction_improves(tmp_path):
    data = tiny_data(96)
    tr, va = data.split(0.25)
    trainer = Trainer(tiny_config(ae_steps=150, dn_steps=0, eval_every=1000, ckpt_every=1000, ae_lr=3e-3), tr,
                      tmp_path, val_set=va, device="cpu", progress=False)  # fmt: skip
    before = trainer.validate()["val_ae_rel_mse"]
    after = trainer.run()["val_ae_rel_mse"]  # final metrics of the exported (EMA) autoencoder
    assert after < 0.6 * before, (before, after)


def test_synthetic_hypernet_beats_mean_adapter_on_heldout_identities(tmp_path):
    """~15 s on one idle core: the conditioned model must recover identity-specific weights of unseen identities
    (the mean adapter has rel_mse 1 and centred cosine 0 by definition)."""
    data = make_synthetic(SyntheticConfig(num_identities=240, seed=1))
    tr, te = data.split(0.25, seed=0)
    cfg = HypernetConfig(
        AutoencoderConfig(hidden=32, heads=2, depth_enc=1, depth_dec=1, latent_tokens=4, latent_dim=8),
        DenoiserConfig(hidden=48, depth=2, heads=2),
        TrainConfig(batch_size=32, ae_steps=300, dn_steps=600, ae_lr=3e-3, dn_lr=2e-3, warmup_steps=20,
                    ema_decay=0.98, eval_every=10**6, ckpt_every=10**6, log_every=50),
        SamplingConfig(steps=20),
    )  # fmt: skip
    train(cfg, tr, tmp_path, device="cpu", progress=False)
    hn = Hypernet.load(tmp_path)
    mean = tr.tokens.mean(0)
    ours = summarize(weight_metrics(hn.predict_tokens(te.cond, steps=20, seed=0), te.tokens, te.mask, mean))
    base = summarize(weight_metrics(MeanAdapter().fit(tr).predict(te.cond), te.tokens, te.mask, mean))
    assert base["rel_mse"] == pytest.approx(1.0)
    assert ours["rel_mse"] < 0.7 * base["rel_mse"], ours
    assert ours["cosine"] > base["cosine"] + 0.1, (ours, base)
    assert ours["centered_cosine"] > 0.6, ours
