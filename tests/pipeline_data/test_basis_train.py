"""``difflora data basis`` and ``data build --method basis`` on the bundled tiny base: a handful of identities
(single-photo people included), a few steps — outputs, exact resume, falling loss, code fit == applying the basis."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline_data.basis_train import BasisTrainConfig, load_codes, train_basis
from pipeline_data.build import load_dataset_adapters, load_dataset_codes, read_records
from tests.utils.datasets import DATASET_IDS, FACES, build_config, tiny_base
from weights.basis import basis_per_sample, basis_to_lora, load_basis

SINGLE = [FACES / "lfw_few" / "AJ_Cook", FACES / "lfw_few" / "Aaron_Eckhart"]  # one photo each, train split
EVAL_ONE = FACES / "lfw_few" / "AJ_Lamas"  # eval split: never trained on
FACES_IN = [*DATASET_IDS, *SINGLE, EVAL_ONE]
STEPS, EVERY, STOP = 12, 4, 6


def config(**kw) -> BasisTrainConfig:
    base = {
        "base": tiny_base(), "num_directions": 4, "rank": 2, "steps": STEPS, "batch_size": 4, "lr_basis": 5e-3,
        "lr_codes": 5e-2, "checkpoint_every": EVERY, "threads": 1,
    }  # fmt: skip
    return BasisTrainConfig(**{**base, **kw})


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("basis") / "full"
    train_basis([str(p) for p in FACES_IN], out, config(), progress=False)
    return out


def test_outputs_cover_the_train_split_with_single_photo_people(trained: Path) -> None:
    recs = [json.loads(ln) for ln in (trained / "identities.jsonl").read_text().splitlines()]
    ids = [r["identity"] for r in recs]
    assert ids == sorted(["lfw__Aaron_Peirsol", "lfw__Abdullah_Gul", "orl__s1", "lfw_few__AJ_Cook",
                          "lfw_few__Aaron_Eckhart"])  # fmt: skip
    assert all(r["split"] == "train" for r in recs)  # the eval-split person is not there
    single = {r["identity"]: r for r in recs}["lfw_few__AJ_Cook"]
    assert single["heldout"] == [] and len(single["photos_used"]) == 1
    multi = {r["identity"]: r for r in recs}["lfw__Abdullah_Gul"]
    assert multi["heldout"] and not set(multi["heldout"]) & set(multi["photos_used"])  # held-out photos removed
    names, codes = load_codes(trained)
    assert names == ids and tuple(codes.shape) == (5, 4)
    basis = load_basis(trained / "basis.safetensors")
    assert basis.num_directions == 4 and basis.rank == 2 and basis.spec.base_model == "tiny"
    assert max(float(u.abs().max()) for u in basis.up.values()) > 0  # the directions trained (they start at 0)
    metrics = [json.loads(ln) for ln in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert (trained / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((trained / "summary.json").read_text())["identities"] == 5


def test_resume_reproduces_the_uninterrupted_run(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"

    def stop(step: int, loss: float) -> None:
        if step == STOP:
            raise Stop

    with pytest.raises(Stop):
        train_basis([str(p) for p in FACES_IN], out, config(), progress=False, on_step=stop)
    with pytest.raises(ValueError, match="pass --resume"):
        train_basis([str(p) for p in FACES_IN], out, config(), progress=False)
    with pytest.raises(ValueError, match="another config"):
        train_basis([str(p) for p in FACES_IN], out, config(rank=3), progress=False, resume=True)
    train_basis([str(p) for p in FACES_IN], out, config(), progress=False, resume=True)
    a, b = load_basis(trained / "basis.safetensors"), load_basis(out / "basis.safetensors")
    for name in a.down:
        torch.testing.assert_close(b.down[name], a.down[name], atol=1e-6, rtol=0)
        torch.testing.assert_close(b.up[name], a.up[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(load_codes(out)[1], load_codes(trained)[1], atol=1e-6, rtol=0)
    ma = [json.loads(ln)["loss"] for ln in (trained / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(mb) == STEPS and max(abs(x - y) for x, y in zip(ma, mb, strict=True)) < 1e-5


def fixed_batch_loss(pipe, basis, codes: torch.Tensor, latents: list[torch.Tensor]) -> float:
    """Denoising loss of every identity's latents at fixed noise and timesteps, through the per-sample forward."""
    from diffusers import DDPMScheduler

    from pipeline_data.adapter_train import denoising_loss, unet_conditioning
    from weights.per_sample import per_sample_adapters

    g = torch.Generator().manual_seed(123)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    x0 = torch.cat(latents)
    who = torch.cat([torch.full((len(z),), i) for i, z in enumerate(latents)])
    total = 0.0
    for _ in range(4):
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (len(x0),), generator=g)
        cond = unet_conditioning(pipe, "a photo of sks person", len(x0), 64, 64)
        with torch.no_grad(), per_sample_adapters(pipe.unet, basis_per_sample(basis, codes[who])):
            total += float(denoising_loss(pipe.unet, sched, x0, noise, t, cond))
    return total / 4


def test_training_lowers_the_loss_of_its_identities(trained: Path) -> None:
    from pipeline_data.basis_train import prepare_training_set, train_sources
    from pipeline_data.build import _worker_state
    from weights.basis import IdentityBasis

    cfg = config()
    recs, lats = prepare_training_set(train_sources([str(p) for p in FACES_IN]), trained, cfg, progress=False)
    pipe = _worker_state(cfg.prep_config())[0]
    basis = load_basis(trained / "basis.safetensors")
    codes = load_codes(trained)[1]
    zero = IdentityBasis(basis.spec, basis.down, {k: torch.zeros_like(v) for k, v in basis.up.items()})
    before, after = fixed_batch_loss(pipe, zero, codes, lats), fixed_batch_loss(pipe, basis, codes, lats)
    assert after < before * 0.99, (before, after)  # 12 steps: 0.1151 -> 0.1135


@pytest.fixture(scope="module")
def basis_dataset(trained: Path, tmp_path_factory) -> Path:
    from pipeline_data.build import build, run_check

    out = tmp_path_factory.mktemp("basis_ds") / "ds"
    fit = {"steps": 6, "batch_size": 4, "lr": 5e-2}
    cfg = build_config(method="basis", basis=str(trained), check_seeds=1, check_steps=2, **fit)
    summary = build([str(p) for p in DATASET_IDS[:2]], out, cfg, progress=False)
    assert summary["ok"] == 2 and not summary["failed"], summary
    run_check(out, cfg, limit=2)
    return out


def test_basis_build_fits_codes_whose_export_equals_the_basis(trained: Path, basis_dataset: Path) -> None:
    from weights.apply import apply_adapter, restore
    from weights.per_sample import per_sample_adapters

    basis = load_basis(trained / "basis.safetensors")
    recs = read_records(basis_dataset)
    assert all(r["status"] == "ok" and r["basis"] == basis.fingerprint() for r in recs.values())
    assert all("check" in r for r in recs.values()) and (basis_dataset / "check.json").is_file()
    assert (basis_dataset / "manifest.jsonl").read_text().count("\n") == 2
    codes, adapters = load_dataset_codes(basis_dataset), load_dataset_adapters(basis_dataset)
    assert codes.keys() == adapters.keys() and len(codes) == 2
    from pipeline_data.build import _worker_state

    pipe = _worker_state(build_config())[0]
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([400])
    ctx = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g)
    for k, code in codes.items():
        assert tuple(code.shape) == (4,) and float(code.abs().max()) > 0  # fitted from zero: it moved
        ad = adapters[k]
        assert ad.spec.method == "lora" and ad.spec.rank == 2
        exported = basis_to_lora(basis, code)
        for name, tensor in exported.tensors.items():
            assert torch.equal(ad.tensors[name], tensor), name
        state = apply_adapter(pipe.unet, ad)
        try:
            with torch.no_grad():
                merged = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        finally:
            restore(pipe.unet, state)
        with torch.no_grad(), per_sample_adapters(pipe.unet, basis_per_sample(basis, code[None])):
            batched = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        torch.testing.assert_close(batched, merged, atol=1e-5, rtol=0)


def test_basis_recipe_replays_with_its_basis(trained: Path, basis_dataset: Path, tmp_path: Path) -> None:
    """The recipe of a basis dataset names its basis; ``data build --recipe`` rebuilds an identity the same way."""
    from pipeline_data.cli import main
    from pipeline_data.recipe import BuildConfig

    cfg = BuildConfig.from_dict(json.loads((basis_dataset / "config.json").read_text()))
    flags = cfg.recipe_flags()
    assert flags["--method"] == "basis" and Path(flags["--basis"]) == trained
    (tmp_path / "bases").mkdir()
    (tmp_path / "bases" / "b").symlink_to(trained)
    flags["--basis"] = "bases/b"  # relative: taken from the recipe's folder
    recipe = tmp_path / "dataset_recipe.json"
    recipe.write_text(json.dumps(flags))
    out = tmp_path / "again"
    rc = main(["build", "--recipe", str(recipe), "--faces", str(DATASET_IDS[0]), "--out", str(out),
               "--base", tiny_base(), "--threads", "1"])  # fmt: skip
    assert rc == 0
    ident = DATASET_IDS[0].parent.name + "__" + DATASET_IDS[0].name
    torch.testing.assert_close(load_dataset_codes(out)[ident], load_dataset_codes(basis_dataset)[ident])


def test_cli_trains_resumes_and_extends_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline_data.cli import main

    out = tmp_path / "cli"
    argv = ["basis", "--faces", str(SINGLE[0]), str(SINGLE[1]), "--out", str(out), "--base", tiny_base(),
            "--directions", "2", "--rank", "1", "--batch-size", "2", "--checkpoint-every", "1",
            "--threads", "1"]  # fmt: skip
    assert main([*argv, "--steps", "2"]) == 0
    assert "basis K=2 rank 1 on 2 identities (2 photos), 2 steps" in capsys.readouterr().out
    assert main([*argv, "--steps", "2"]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main([*argv, "--steps", "3", "--resume"]) == 0  # more steps: the run goes on from its checkpoint
    assert [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert main([*argv, "--steps", "2", "--resume"]) == 2
    assert "beyond --steps 2" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["{basis}", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
        (["{basis}", "--directions", "0"], "argument --directions: must be >= 1, got 0"),
        (["{basis}", "--lr-codes", "nan"], "argument --lr-codes: must be a finite number"),
        (["{basis}", "--max-photos", "1", "--min-photos", "2"], "max_photos (1) must be >= min_photos (2)"),
        (["{basis}", "--targets", "nosuchmodule"], "--targets: no module of the model matches"),
        (["{basis}", "--base", "nosuch"], "--base 'nosuch' is neither a preset"),
        (["basis", "--faces", "{tmp}/missing", "--out", "{out}"], "faces directory not found"),
        (["basis", "--faces", str(EVAL_ONE), "--out", "{out}"], "no train-split identity folders"),
        (["{build}", "--method", "basis"], "method basis needs the identity basis"),
        (["{build}", "--basis", "{tmp}"], "basis applies to method basis only"),
        (["{build}", "--method", "basis", "--basis", "{tmp}"], "no such basis file"),
        (["{build}", "--recipe", "{tmp}/none.json"], "--recipe {tmp}/none.json: cannot read it"),
        (["{build}", "--recipe", "{bad_recipe}"], "unknown option '--nope'"),
    ],
)
def test_cli_bad_options_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    from pipeline_data.cli import main

    out = tmp_path / "out"
    bad_recipe = tmp_path / "bad.json"
    bad_recipe.write_text(json.dumps({"--steps": 2, "--nope": 1}))
    common = ["--faces", str(DATASET_IDS[0]), "--out", str(out), "--base", tiny_base(), "--threads", "1"]
    subst = {"{basis}": ["basis", *common], "{build}": ["build", *common], "{out}": [str(out)]}
    subst["{bad_recipe}"] = [str(bad_recipe)]
    args = [x.replace("{tmp}", str(tmp_path)) for a in argv for x in subst.get(a, [a])]
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("difflora data") and needle.replace("{tmp}", str(tmp_path)) in lines[0], lines[0]
    assert not out.exists()
