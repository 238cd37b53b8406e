"""The evaluation table on a real (tiny) dataset: definitions pinned by the base and oracle candidates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from hypernet.evaluate import EvalConfig, evaluate
from hypernet.predict import Predictor
from hypernet.table import write_results
from pipeline_data.models import load_pipeline
from pipeline_data.recipe import BuildConfig


@pytest.fixture(scope="module")
def eval_setup(tiny_dataset: Path, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eval")
    ds = root / "ds"
    shutil.copytree(tiny_dataset, ds)
    lines = [json.loads(x) for x in (ds / "manifest.jsonl").read_text().splitlines()]
    for r in lines:  # hold one identity out as the eval split
        r["split"] = "eval" if r["identity"] == "orl__s1" else "train"
    (ds / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    recipe = BuildConfig.from_dict(json.loads((ds / "config.json").read_text()))
    pipe = load_pipeline(recipe.base)
    Predictor.untrained(pipe, recipe).save(root / "ckpt")
    return ds, root / "ckpt"


def test_eval_table_definitions(eval_setup, tmp_path: Path) -> None:
    ds, ckpt = eval_setup
    cfg = EvalConfig(seeds=2, gen_steps=4, sample_steps=4, timesteps=(100, 500), mlp_epochs=5)
    res = evaluate(ds, ckpt, cfg)
    assert res["n_identities"] == 1
    b = res["baselines"]
    assert set(b) == {"base", "mean", "nearest", "mlp", "oracle"}
    assert b["oracle"]["function_fidelity"] == pytest.approx(1.0)
    assert b["base"]["function_fidelity"] == pytest.approx(0.0)
    assert b["oracle"]["weight_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert b["base"]["identity_gain"]["mean"] == 0.0
    if b["oracle"]["identity_gain"]["mean"] != 0:
        assert b["oracle"]["identity_recovery"] == pytest.approx(1.0)
    # the untrained hypernet predicts the init adapter (ΔW = 0): exactly the base model
    assert res["function_fidelity"] == pytest.approx(0.0, abs=1e-6)
    assert res["hypernet"]["identity_gain"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert res["hypernet"]["weight_cosine"] == 0.0
    assert 0.0 <= res["hypernet"]["no_face_rate"] <= 1.0
    assert "hypernet_recovery_advantage" not in res["hypernet"] and "hypernet_recovery_advantage" in b["nearest"]
    write_results(res, tmp_path / "quality.json")
    assert json.loads((tmp_path / "quality.json").read_text())["n_identities"] == 1
    assert (tmp_path / "quality.png").stat().st_size > 1000


def test_recovery_advantage_is_the_paired_difference_of_recoveries() -> None:
    """The hypernet's advantage over a baseline is rec(hypernet) - rec(baseline) (same oracle gains), with a paired
    bootstrap interval that is narrower than the two recoveries' own intervals when the identities co-vary."""
    from hypernet.table import summarize_candidates

    rng = np.random.default_rng(0)
    base = rng.uniform(0.80, 0.85, 40)
    shared = rng.normal(0, 0.01, 40)  # identity difficulty both candidates share
    sims = {
        "base": base,
        "oracle": base + 0.05 + shared,
        "hypernet": base + 0.04 + shared,
        "nearest": base + 0.02 + shared,
    }
    per = {c: {f"id{i}": {"sim": float(v[i]), "function_fidelity": 0.0, "weight_cosine": 0.0, "no_face": 0.0}
               for i in range(40)} for c, v in sims.items()}  # fmt: skip
    rows = summarize_candidates(per)
    adv = rows["nearest"]["hypernet_recovery_advantage"]
    want = rows["hypernet"]["identity_recovery"] - rows["nearest"]["identity_recovery"]
    assert adv["mean"] == pytest.approx(want) and adv["ci95"][0] < want < adv["ci95"][1]
    assert "hypernet_recovery_advantage" not in rows["hypernet"]


def test_eval_on_the_val_split_with_chosen_baselines(eval_setup, tmp_path: Path) -> None:
    src, ckpt = eval_setup
    ds = tmp_path / "ds"
    shutil.copytree(src, ds)
    lines = [json.loads(x) for x in (ds / "manifest.jsonl").read_text().splitlines()]
    for r in lines:  # the former eval identity becomes the only val identity
        r["split"] = "val" if r["split"] == "eval" else r["split"]
    (ds / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    cfg = EvalConfig(
        seeds=1, gen_steps=3, sample_steps=3, timesteps=(300,), split="val", baselines=("mean", "autoencoder"),
        samples=2, mlp_epochs=2, mlp_scales=(3,), variants=([2, 1, 1],),
    )  # fmt: skip
    res = evaluate(ds, ckpt, cfg)
    assert res["split"] == "val" and res["n_identities"] == 1
    assert set(res["baselines"]) == {"base", "mean", "autoencoder", "oracle"}
    # the untrained hypernet's autoencoder decodes every adapter to the mean init (ΔW = 0): the base model's function
    assert res["baselines"]["autoencoder"]["function_fidelity"] == pytest.approx(0.0, abs=1e-6)
    assert set(res["variants"]) == {"mlp_x3", "hypernet_cfg2_x1_s1"}  # extra rows, same identities and seeds
    assert 0.0 <= res["variants"]["mlp_x3"]["no_face_rate"] <= 1.0
    assert res["config"]["samples"] == 2 and res["config"]["cfg_scale"] == 1.0  # the checkpoint's default
    with pytest.raises(ValueError, match="split"):
        EvalConfig(split="test")
    with pytest.raises(ValueError, match="baselines"):
        EvalConfig(baselines=("knn",))


def test_eval_refuses_dataset_without_eval_split(tiny_dataset: Path, eval_setup) -> None:
    _, ckpt = eval_setup
    with pytest.raises(ValueError, match="need train and eval identities"):
        evaluate(tiny_dataset, ckpt, EvalConfig(seeds=1))


def test_tune_writes_the_chosen_sampling_options(eval_setup, tmp_path: Path, capsys) -> None:
    from hypernet.checkpoint import load_config
    from hypernet.cli import main
    from hypernet.config import SamplingConfig

    src, ckpt_src = eval_setup
    ds, ckpt = tmp_path / "ds", tmp_path / "ckpt"
    shutil.copytree(src, ds)
    shutil.copytree(ckpt_src, ckpt)
    lines = [json.loads(x) for x in (ds / "manifest.jsonl").read_text().splitlines()]
    for r in lines:
        r["split"] = "val" if r["split"] == "eval" else r["split"]
    (ds / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    config_before = (ckpt / "config.json").read_bytes()
    argv = ["tune", "--dataset", str(ds), "--checkpoint", str(ckpt), "--cfg-scales", "3,1", "--samples", "2,1",
            "--steps", "2,1", "--seeds", "1", "--limit", "1"]  # fmt: skip
    assert main(argv) == 0
    tuning = json.loads((ckpt / "tuning.json").read_text())
    assert len(tuning["scores"]) == 8 and tuning["split"] == "val"
    assert {(s["cfg_scale"], s["samples"], s["sample_steps"]) for s in tuning["scores"]} == {
        (c, n, k) for c in (1.0, 3.0) for n in (1, 2) for k in (1, 2)
    }
    # the untrained hypernet predicts ΔW = 0 for every option: a tie, so the cheapest option wins
    assert (tuning["chosen"]["cfg_scale"], tuning["chosen"]["samples"], tuning["chosen"]["sample_steps"]) == (1, 1, 1)
    assert load_config(ckpt).sampling == SamplingConfig(steps=1, cfg_scale=1.0, samples=1)
    assert (ckpt / "config.json").read_bytes() == config_before  # tune rewrites sampling.json only
    assert Predictor.load(ckpt).cfg_scale == 1.0
    assert main(["tune", "--dataset", str(ds), "--checkpoint", str(ckpt), "--samples", "x"]) == 2
    assert "--samples" in capsys.readouterr().err


def _score(cfg: float, rec: float, no_face: float, samples: int = 1, steps: int = 1) -> dict:
    return {"cfg_scale": cfg, "identity_recovery": rec, "no_face_rate": no_face, "samples": samples,
            "sample_steps": steps}  # fmt: skip


@pytest.mark.parametrize(
    ("scores", "base_no_face", "want_cfg", "met"),
    [
        ([_score(1, 0.2, 0.0), _score(4, 0.9, 0.02), _score(8, 1.1, 0.24)], 0.0, 4, True),  # 8 loses faces
        ([_score(1, 0.2, 0.2), _score(8, 1.1, 0.24)], 0.2, 8, True),  # measured against the base model's rate
        ([_score(4, 0.9, 0.5), _score(8, 1.1, 0.6)], 0.0, 8, False),  # none within the bound: best of all
        ([_score(2, float("nan"), 0.0), _score(1, 0.1, 0.0)], 0.0, 1, True),  # NaN never wins
        ([_score(3, 0.0, 0.0), _score(1, 0.0, 0.0, steps=25), _score(2, 0.0, 0.0)], 0.0, 2, True),  # tie: cheap
    ],
)
def test_tune_choice_respects_the_no_face_bound(scores, base_no_face, want_cfg, met) -> None:
    from hypernet.tune import choose_option

    best, ok = choose_option(scores, base_no_face, 0.05)
    assert best["cfg_scale"] == want_cfg and ok is met


def test_score_candidates_is_pinned_by_the_oracle(eval_setup) -> None:
    """The per-identity scorer (also used by bench/probes/fidelity_ceiling.py): a copy of the oracle scores exactly
    like the oracle, the base model has fidelity 0."""
    from diffusers import DDPMScheduler

    from hypernet.adapter_data import load_adapter_dataset
    from hypernet.evaluate import score_candidates
    from pipeline_data.check import generate
    from pipeline_data.faces import get_encoder

    ds_dir, _ = eval_setup
    ds = load_adapter_dataset(ds_dir, token_dim=64, splits=("eval",))
    pipe = load_pipeline(ds.recipe["base"])
    cfg = EvalConfig(seeds=1, gen_steps=2, timesteps=(400,))
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    base_imgs = generate(pipe, ds.recipe["caption"], [0], steps=2, guidance=cfg.guidance, size=size)
    doubled = ds.adapter(0, ds.data.tokens[0] * 2)  # LoRA A and B doubled: the oracle's ΔW x 4
    cands = {"base": None, "oracle": ds.adapter(0), "copy": ds.adapter(0), "doubled": doubled}
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    res = score_candidates(pipe, sched, get_encoder(ds.face_backend), ds.records[0], cands, cfg, base_imgs, ds.recipe)
    for key in ("function_fidelity", "function_fidelity_heldout", "function_cosine"):
        assert res["copy"][key] == pytest.approx(1.0) and res["base"][key] == 0.0, key
    assert res["copy"]["sim"] == pytest.approx(res["oracle"]["sim"])
    assert res["copy"]["weight_cosine"] == pytest.approx(1) and res["base"]["weight_cosine"] == 0.0
    assert set(res["base"]) == {
        "sim", "function_fidelity", "function_fidelity_heldout", "function_cosine", "weight_cosine", "no_face",
        "heldout_loss",
    }  # fmt: skip
    assert res["copy"]["heldout_loss"] == res["oracle"]["heldout_loss"] != res["base"]["heldout_loss"]
    # the cosine sees the direction of the effect, fidelity also its size (about 4x too large here)
    assert res["doubled"]["function_cosine"] > 0.9 and res["doubled"]["function_fidelity"] < 0
    # generations made once are reused (bench/probes/fidelity_ceiling.py scores one set against two references):
    # the same metrics, and the given images really are the ones scored
    from hypernet.evaluate import candidate_images

    imgs = candidate_images(pipe, cands, cfg, base_imgs, ds.recipe)
    again = score_candidates(
        pipe, sched, get_encoder(ds.face_backend), ds.records[0], cands, cfg, base_imgs, ds.recipe, imgs
    )
    assert again == res
    swapped = score_candidates(
        pipe, sched, get_encoder(ds.face_backend), ds.records[0], cands, cfg, base_imgs, ds.recipe,
        {"doubled": imgs["base"]},
    )  # fmt: skip
    assert swapped["doubled"]["sim"] == pytest.approx(res["base"]["sim"]) != res["doubled"]["sim"]
