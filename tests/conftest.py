"""Shared fixtures: the small adapter dataset built once per test session on the bundled tiny base."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.utils.datasets import DATASET_IDS, build_config
from tests.utils.faces import require_faces


def pytest_configure(config) -> None:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A 3-identity LoRA dataset (12 steps each) built by the real ``pipeline_data.build``."""
    from pipeline_data.build import build

    require_faces()
    out = tmp_path_factory.mktemp("ds") / "local"
    summary = build([str(p) for p in DATASET_IDS], out, build_config(), progress=False)
    assert summary["ok"] == 3 and not summary["failed"], summary
    return out
