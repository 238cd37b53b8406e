"""Service fixtures: the tiny world (the bundled base model when present, else a tiny pipeline built from config; the
bundled hypernet when present, else an untrained one), the obama photos, and a module-scoped TestClient on a fully
loaded app."""

from __future__ import annotations

import time

import pytest

from pipeline_data.models import TINY_BASE
from service.settings import TINY_HYPERNET
from tests.utils.faces import PHOTOS, require_faces

OBAMA = sorted(PHOTOS.glob("obama*.jpg"))
ALEX = sorted(PHOTOS.glob("alex*.jpg"))
STEPS = 3  # denoising steps in tests (the tiny model is about correctness here, not quality)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One torch thread: on a shared 2-core machine OpenMP spin-waiting makes 2 threads ~100x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> dict:
    """Settings overrides for the tiny world: ``{"model_path": ..., "untrained_hypernet": ...}``."""
    if (TINY_BASE / "model_index.json").is_file():
        return {"model_path": str(TINY_BASE), "untrained_hypernet": not (TINY_HYPERNET / "config.json").is_file()}
    from tests.utils.tiny_pipes import tiny_sd15_pipe

    d = tmp_path_factory.mktemp("tiny_base")
    tiny_sd15_pipe().save_pretrained(d)
    return {"model_path": str(d), "untrained_hypernet": True}


def photo_files(paths, field: str = "photos") -> list:
    return [(field, (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


def wait_ready(client, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        r = client.get("/readyz")
        if r.status_code == 200:
            return
        if r.json()["error"]["code"] == "load_failed":
            raise RuntimeError(r.json())
        time.sleep(0.1)
    raise TimeoutError("service not ready")


@pytest.fixture(scope="module")
def client(tiny_world, tmp_path_factory):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    s = Settings(data_dir=tmp_path_factory.mktemp("data"), default_steps=STEPS, queue_size=4, threads=1, **tiny_world)
    with TestClient(create_app(s)) as c:
        wait_ready(c)
        yield c


@pytest.fixture(scope="module")
def identity(client) -> dict:
    require_faces()
    r = client.post("/v1/identities", files=photo_files(OBAMA[:3]), data={"name": "obama"})
    assert r.status_code == 201, r.text
    return r.json()
