"""A tiny identity-basis world on the bundled tiny base: a basis (``data basis``), a codes dataset (``data build
--method basis``) and a hypernet over its codes (``hypernet train``), each in seconds."""

from __future__ import annotations

from pathlib import Path

from tests.utils.datasets import DATASET_IDS, FACES, build_config, tiny_base

SINGLE = [FACES / "lfw_few" / "AJ_Cook", FACES / "lfw_few" / "Aaron_Eckhart"]  # one photo each, train split
K = 8  # code size: tokens (2, 4)
# a tiny DiT and a few steps: the tests check the plumbing, not the quality
HYPERNET_SETTINGS = [
    "denoiser.hidden=32", "denoiser.depth=1", "denoiser.heads=2", "train.dn_steps=30", "train.batch_size=4",
    "sampling.steps=4", "train.eval_every=10", "train.ckpt_every=10", "train.warmup_steps=2", "train.dn_lr=3e-3",
]  # fmt: skip
MAX_PHOTOS = 5  # photos read per person (fewer faces to detect; every person keeps one held out)
FIT = {"steps": 6, "batch_size": 4, "lr": 5e-2}  # the codes' fit (and refine's learning rate and batch)


def make_basis(out: Path) -> Path:
    from pipeline_data.basis_train import BasisTrainConfig, train_basis

    cfg = BasisTrainConfig(
        base=tiny_base(), num_directions=K, rank=2, steps=12, batch_size=4, lr_basis=5e-3, lr_codes=5e-2,
        checkpoint_every=12, threads=1, max_photos=MAX_PHOTOS,
    )  # fmt: skip
    train_basis([str(p) for p in DATASET_IDS], out, cfg, progress=False)
    return out


def make_codes_dataset(basis: Path, out: Path) -> Path:
    from pipeline_data.build import build

    cfg = build_config(method="basis", basis=str(basis), max_photos=MAX_PHOTOS, **FIT)
    summary = build([str(p) for p in DATASET_IDS], out, cfg, progress=False)
    assert summary["ok"] == 3 and not summary["failed"], summary
    return out


def make_hypernet(dataset: Path, out: Path, **kw) -> Path:
    from hypernet.fit import train_on_dataset

    train_on_dataset(dataset, out, settings=HYPERNET_SETTINGS, device="cpu", progress=False, **kw)
    return out
