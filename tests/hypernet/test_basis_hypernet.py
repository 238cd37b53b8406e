"""The hypernet over identity-basis codes on the real tiny pipeline: train -> save -> load -> predict, the
end-to-end fine-tune (lowers the photos' denoising loss, resumes exactly) and refine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hypernet.basis_predict import BasisPredictor
from hypernet.code_autoencoder import code_mask, code_token_shape, codes_to_tokens, tokens_to_codes
from hypernet.code_data import load_code_dataset
from hypernet.evaluate import identity_crops
from hypernet.finetune import FinetuneConfig, Finetuner
from hypernet.predict import Predictor
from tests.utils.basis_world import SINGLE, K
from tests.utils.datasets import DATASET_IDS
from weights.apply import apply_adapter, restore
from weights.basis import basis_to_lora, load_basis


@pytest.mark.parametrize(
    ("k", "shape"), [(1, (1, 1)), (8, (2, 4)), (32, (4, 8)), (64, (8, 8)), (128, (8, 16)), (31, (6, 6)), (6, (2, 3))]
)
def test_code_token_shape_and_round_trip(k: int, shape: tuple[int, int]) -> None:
    assert code_token_shape(k) == shape
    codes = torch.randn(3, k, generator=torch.Generator().manual_seed(k))
    tok = codes_to_tokens(codes, *shape)
    assert tok.shape == (3, *shape) and int(code_mask(k, *shape).sum()) == k
    assert torch.equal(tokens_to_codes(tok, k), codes)
    assert float(tok.reshape(3, -1)[:, k:].abs().sum()) == 0.0  # padding is zero


def test_codes_dataset_loads_codes_and_basis(basis_world) -> None:
    ds = load_code_dataset(basis_world["dataset"])
    assert ds.codes.shape == (3, K) and ds.data.tokens.shape == (3, *code_token_shape(K))
    assert ds.basis.fingerprint() == load_basis(basis_world["basis"] / "basis.safetensors").fingerprint()
    assert all(c.shape[1] == 128 for c in ds.data.cond)
    with pytest.raises(ValueError, match="not a codes dataset"):
        load_code_dataset(basis_world["hypernet"])  # any folder without a basis build config


def test_train_save_load_predict_is_basis_to_lora_of_the_sampled_code(basis_world, tmp_path: Path) -> None:
    pred = Predictor.load(basis_world["hypernet"])
    assert isinstance(pred, BasisPredictor) and pred.supports_refine
    assert pred.hypernet.config.autoencoder.kind == "basis" and pred.num_directions == K
    ds = load_code_dataset(basis_world["dataset"])
    codes = pred.predict_codes(ds.data.cond, seed=3)  # (3, K)
    assert codes.shape == (3, K) and codes.abs().sum() > 0
    adapters = pred.predict_batch(ds.data.cond, seed=3)
    basis = load_basis(basis_world["basis"] / "basis.safetensors")
    for a, c in zip(adapters, codes, strict=True):
        want = basis_to_lora(basis, c)
        assert a.spec.method == "lora" and a.spec.hash() == want.spec.hash()
        assert all(torch.allclose(a.tensors[k], want.tensors[k], atol=1e-7) for k in want.tensors)
    # a round trip through save() keeps the predictions, and the adapter applies like basis_to_lora of its code
    pred.save(tmp_path / "copy")
    again = Predictor.load(tmp_path / "copy")
    assert torch.allclose(again.predict_codes(ds.data.cond, seed=3), codes, atol=1e-6)
    from pipeline_data.models import load_pipeline

    unet = load_pipeline(pred.base).unet
    lay = adapters[0].spec.layers[0].name
    w0 = unet.get_submodule(lay).weight.detach().clone()
    state = apply_adapter(unet, adapters[0])
    delta = unet.get_submodule(lay).weight.detach() - w0
    restore(unet, state)
    A, B = basis.down[lay], torch.einsum("k,kmr->mr", codes[0], basis.up[lay])
    assert torch.allclose(delta.reshape(delta.shape[0], -1), basis.spec.scale * B @ A, atol=1e-6)


def _finetuner(basis_world, out: Path, **kw) -> Finetuner:
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "prepared").exists():  # the basis training prepared these identities the same way: reuse them
        shutil.copytree(basis_world["basis"] / "prepared", out / "prepared")
    base = {"steps": 10, "identities": 3, "batch_size": 8, "lr": 3e-3, "warmup_steps": 1, "checkpoint_every": 100}
    cfg = FinetuneConfig(**{**base, **kw})
    return Finetuner(basis_world["hypernet"], [str(p) for p in DATASET_IDS], out, cfg, progress=False)


def test_finetune_lowers_the_denoising_loss_of_its_photos(basis_world, tmp_path: Path) -> None:
    ft = _finetuner(basis_world, tmp_path / "ft", code_weight=0.0)
    ft._check_out(resume=False)
    ft._setup()
    assert len(ft.data.records) == 3 and not ft.data.codes  # no --dataset: no code loss
    before = ft.photo_loss(timesteps=2)
    for _ in range(ft.cfg.steps):
        rec = ft.train_step()
        assert np.isfinite(rec["loss"]) and rec["code_loss"] == 0.0
    after = ft.photo_loss(timesteps=2)
    assert after < before, (before, after)  # small (about 1e-4 on this world) but at fixed seeds deterministic


class Stop(Exception):
    pass


def test_finetune_run_writes_a_predictor_and_resumes_exactly(basis_world, tmp_path: Path) -> None:
    kw = {"steps": 4, "checkpoint_every": 2, "identities": 2, "batch_size": 4}
    full = _finetuner(basis_world, tmp_path / "full", **kw)
    summary = full.run()
    assert summary["steps"] == 4 and summary["identities"] == 3
    out = tmp_path / "full"
    assert isinstance(Predictor.load(out), BasisPredictor)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and (out / "metrics.png").read_bytes()[:4] == b"\x89PNG"

    def stop(step: int, loss: float) -> None:
        if step == 2:
            raise Stop

    cut = _finetuner(basis_world, tmp_path / "cut", **kw)
    with pytest.raises(Stop):
        cut.run(on_step=stop)
    with pytest.raises(ValueError, match="--resume"):
        _finetuner(basis_world, tmp_path / "cut", **kw).run()
    with pytest.raises(ValueError, match="other options"):
        _finetuner(basis_world, tmp_path / "cut", **{**kw, "lr": 1.0}).run(resume=True)
    _finetuner(basis_world, tmp_path / "cut", **kw).run(resume=True)
    a, b = load_file(str(out / "ema.safetensors")), load_file(str(tmp_path / "cut" / "ema.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_config_refuses_bad_values() -> None:
    for bad in ({"splits": "train,eval"}, {"steps": 0}, {"lr": 0.0}, {"code_weight": -1.0}):
        with pytest.raises(ValueError):
            FinetuneConfig(**bad)
    with pytest.raises(ValueError, match="unknown"):
        FinetuneConfig.from_dict({"colour": 1}, strict=True)
    with pytest.raises(ValueError, match="integer"):
        FinetuneConfig.from_dict({"steps": "ten"}, strict=True)


def _photo_loss(pipe, basis, code: torch.Tensor, crops: np.ndarray) -> float:
    """Denoising loss of a code's adapter on the crops at fixed VAE samples, noise and timesteps."""
    from hypernet.evaluate import photo_inputs

    lat, noise, ts, cond = photo_inputs(pipe, crops, (100, 300, 500, 700, 900), "a photo of sks person", 0)
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    state = apply_adapter(pipe.unet, basis_to_lora(basis, code))
    try:
        with torch.no_grad():
            eps = pipe.unet(sched.add_noise(lat, noise, ts), ts, **cond).sample
    finally:
        restore(pipe.unet, state)
    return float(((eps - noise) ** 2).mean())


def test_refine_lowers_the_loss_on_the_photos_and_is_bounded(basis_world) -> None:
    from pipeline_data.faces import get_encoder
    from pipeline_data.models import load_pipeline

    pred = Predictor.load(basis_world["hypernet"])
    ds = load_code_dataset(basis_world["dataset"])
    pipe = load_pipeline(pred.base)
    crops = identity_crops(ds.records[1], get_encoder("dlib"), 64, 0.3)
    code = pred.predict_codes([ds.data.cond[1]])[0]
    res = pred.refine(pipe, crops, code, 8)
    assert res.seconds > 0 and len(res.losses) == 8 and not torch.equal(res.code, code)
    assert _photo_loss(pipe, pred.basis, res.code, crops) < _photo_loss(pipe, pred.basis, code, crops)
    assert torch.equal(pred.refine(pipe, crops, code, 0).code, code)  # 0 steps: the prediction itself
    for bad in (-1, 201, 2.5):
        with pytest.raises(ValueError, match="0 .. 200"):
            pred.refine(pipe, crops, code, bad)


def test_refine_from_photos_reports_its_seconds(basis_world) -> None:
    pred = Predictor.load(basis_world["hypernet"])
    photos = sorted(str(p) for p in SINGLE[0].iterdir())
    adapter, report = pred.predict_photos(photos, refine_steps=2)
    assert adapter.spec.method == "lora" and report["refine_seconds"] > 0
    plain, report0 = pred.predict_photos(photos)
    assert report0["refine_seconds"] == 0.0
    assert any(not torch.equal(adapter.tensors[k], plain.tensors[k]) for k in plain.tensors)


def test_predict_cli_refine_steps(basis_world, tmp_path: Path, capsys) -> None:
    from hypernet.cli import predict_main
    from weights.io import load_any

    photos = sorted(str(p) for p in DATASET_IDS[0].iterdir())[:2]
    ckpt = str(basis_world["hypernet"])
    out = tmp_path / "refined.safetensors"
    assert predict_main([*photos, "--checkpoint", ckpt, "--out", str(out), "--refine-steps", "2"]) == 0
    assert "refined 2 steps in" in capsys.readouterr().out and load_any(out).spec.method == "lora"
    for bad in ("-1", "201"):
        assert predict_main([*photos, "--checkpoint", ckpt, "--out", str(out), "--refine-steps", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--refine-steps must be an integer in 0 .. 200" in err[0]


def test_predict_cli_refine_needs_a_basis_checkpoint(tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    from hypernet.cli import predict_main
    from pipeline_data.models import load_pipeline
    from tests.utils.datasets import tiny_base

    Predictor.untrained(load_pipeline(tiny_base())).save(tmp_path / "lora")
    photos = sorted(str(p) for p in DATASET_IDS[0].iterdir())[:2]
    argv = [*photos, "--checkpoint", str(tmp_path / "lora"), "--out", str(tmp_path / "a.safetensors")]
    assert predict_main([*argv, "--refine-steps", "2"]) == 2
    assert "--refine-steps needs a hypernet over identity-basis codes" in capsys.readouterr().err


def test_finetune_cli_runs_and_refuses_bad_settings(basis_world, tmp_path: Path, capsys) -> None:
    from hypernet.cli import main

    out = tmp_path / "ft"
    out.mkdir()
    shutil.copytree(basis_world["basis"] / "prepared", out / "prepared")
    argv = ["finetune", "--checkpoint", str(basis_world["hypernet"]), "--faces", *map(str, DATASET_IDS[:2]),
            "--out", str(out), "--dataset", str(basis_world["dataset"]), "--no-progress"]  # fmt: skip
    sets = ["--set", "steps=2", "--set", "identities=2", "--set", "batch_size=2"]
    assert main([*argv, *sets]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and summary["with_codes"] == 2  # both people have fitted codes in the dataset
    assert isinstance(Predictor.load(out), BasisPredictor)
    for bad, msg in (("colour=red", "unknown"), ("steps=ten", "must be an integer"), ("splits=eval", "never eval")):
        assert main([*argv, "--set", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
