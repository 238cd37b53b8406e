"""One fully loaded app for the reliability suite (tiny world, an API key, a 4 MiB body cap), shared by its modules."""

from __future__ import annotations

import pytest

from tests.reliability.corpus import MAX_BODY, MAX_PHOTOS
from tests.service.conftest import STEPS, one_torch_thread, tiny_world, wait_ready  # noqa: F401 (fixtures)

KEY = "reliability-key-0123456789"
AUTH = {"X-API-Key": KEY}


@pytest.fixture(scope="session")
def rel_app(tiny_world, tmp_path_factory):  # noqa: F811
    """``(TestClient, data_dir)``: a loaded, ready app; the client does not send the key by itself."""
    import torch
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    torch.set_num_threads(1)
    data = tmp_path_factory.mktemp("reldata")
    s = Settings(
        data_dir=data, default_steps=STEPS, queue_size=4, threads=1, api_key=KEY, max_body_bytes=MAX_BODY,
        max_photos=MAX_PHOTOS, **tiny_world,
    )  # fmt: skip
    app = create_app(s)
    with TestClient(app, raise_server_exceptions=False) as c:
        wait_ready(c, timeout=600)  # a loaded shared CPU can take minutes to import and load
        yield c, data.resolve()
