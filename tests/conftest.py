"""Shared fixtures: the small adapter dataset built once per test session on the bundled tiny base."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.utils.datasets import DATASET_IDS, build_config


def pytest_configure(config) -> None:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A 3-identity LoRA dataset (12 steps each) built by the real ``pipeline_data.build``."""
    from pipeline_data.build import build

    out = tmp_path_factory.mktemp("ds") / "local"
    summary = build([str(p) for p in DATASET_IDS], out, build_config(), progress=False)
    assert summary["ok"] == 3 and not summary["failed"], summary
    return out


@pytest.fixture(scope="session")
def basis_world(tmp_path_factory) -> dict[str, Path]:
    """``{"basis", "dataset", "hypernet"}``: a tiny identity basis, a 3-identity codes dataset fitted in it and a
    hypernet trained on its codes (tests/utils/basis_world.py)."""
    from tests.utils.basis_world import make_basis, make_codes_dataset, make_hypernet

    root = tmp_path_factory.mktemp("basis_world")
    basis = make_basis(root / "basis")
    dataset = make_codes_dataset(basis, root / "dataset")
    return {"basis": basis, "dataset": dataset, "hypernet": make_hypernet(dataset, root / "hypernet")}
