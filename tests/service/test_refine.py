"""``POST /v1/identities`` with ``refine_steps``: bounded (422 naming the field), a basis predictor refines and
reports the seconds, other predictors refuse it with a clear 422."""

from __future__ import annotations

import pytest

from pipeline_data.cliargs import MAX_REFINE_STEPS
from tests.service.conftest import OBAMA, STEPS, photo_files, wait_ready


@pytest.fixture(scope="module")
def basis_client(basis_world, tiny_world, tmp_path_factory):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    s = Settings(
        data_dir=tmp_path_factory.mktemp("data"), default_steps=STEPS, queue_size=4, threads=1,
        model_path=tiny_world["model_path"], hypernet_path=str(basis_world["hypernet"]),
    )  # fmt: skip
    with TestClient(create_app(s)) as c:
        wait_ready(c)
        yield c


@pytest.mark.parametrize("value", [-1, MAX_REFINE_STEPS + 1, "many"])
def test_refine_steps_out_of_bounds_is_a_422_naming_the_field(basis_client, value) -> None:
    r = basis_client.post("/v1/identities", files=photo_files(OBAMA[:2]), data={"refine_steps": str(value)})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_request" and "refine_steps" in err["message"]
    assert err["details"][0]["field"] == "refine_steps"


def test_basis_predictor_refines_and_reports_seconds(basis_client) -> None:
    plain = basis_client.post("/v1/identities", files=photo_files(OBAMA[:2]))
    assert plain.status_code == 201, plain.text
    assert "refine" not in plain.json()["seconds"]
    r = basis_client.post("/v1/identities", files=photo_files(OBAMA[:2]), data={"refine_steps": "3"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["seconds"]["refine"] > 0 and body["adapter"]["method"] == "lora"
    a = basis_client.get(f"/v1/identities/{plain.json()['id']}/adapter").content
    b = basis_client.get(f"/v1/identities/{body['id']}/adapter").content
    assert a != b  # the refined code is another adapter
    gen = basis_client.post("/v1/generations", json={"identity_id": body["id"], "prompt": "a photo", "seed": 1})
    assert gen.status_code == 200, gen.text


def test_refine_on_a_lora_token_predictor_is_a_clear_422(client) -> None:
    r = client.post("/v1/identities", files=photo_files(OBAMA[:2]), data={"refine_steps": "2"})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "refine_unsupported" and err["details"][0]["field"] == "refine_steps"
