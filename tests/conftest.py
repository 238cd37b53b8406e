"""Shared fixtures: the small adapter dataset built once per test session on the bundled tiny base."""

from __future__ import annotations

import os
import secrets
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


@pytest.fixture(scope="session")
def postgres_server():
    """A throw-away PostgreSQL server for the session (``tests/utils/postgres.py``), stopped at the end even when
    tests fail; where none can be started, every test that needs it is skipped with the reason."""
    from tests.utils.postgres import Unavailable, start

    try:
        srv = start()
    except Unavailable as e:
        pytest.skip(str(e))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path_factory) -> str | None:
    """Each storage/job test runs on both backends: None (SQLite in the data directory) and a fresh PostgreSQL
    database."""
    if request.param == "sqlite":
        return None
    from tests.utils.postgres import fresh_database

    srv = request.getfixturevalue("postgres_server")
    return fresh_database(srv.url, f"t_{secrets.token_hex(6)}")


@pytest.fixture(scope="session")
def basis_world(tmp_path_factory) -> dict[str, Path]:
    """``{"basis", "dataset", "hypernet"}``: a tiny identity basis, a 3-identity codes dataset fitted in it and a
    hypernet trained on its codes (tests/utils/basis_world.py)."""
    from tests.utils.basis_world import make_basis, make_codes_dataset, make_hypernet

    root = tmp_path_factory.mktemp("basis_world")
    basis = make_basis(root / "basis")
    dataset = make_codes_dataset(basis, root / "dataset")
    return {"basis": basis, "dataset": dataset, "hypernet": make_hypernet(dataset, root / "hypernet")}
