"""Personalization by fine-tuning (POST /v1/finetunes) on the tiny model with the hypernet switched off
(``hypernet="off"``): readyz says so, /v1/identities refuses, the job trains the adapter with the dataset recipe
on the uploaded photos, reports progress, stores the identity once, resumes after a restart, cancels."""

from __future__ import annotations

import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.finetune import identity_of
from service.settings import Settings
from tests.service.conftest import OBAMA, STEPS, photo_files, wait_ready


def _settings(data_dir, tiny_world, **kw) -> Settings:
    world = {k: v for k, v in tiny_world.items() if k != "untrained_hypernet"}
    return Settings(data_dir=data_dir, default_steps=STEPS, threads=1, hypernet="off", max_finetune_steps=40,
                    **world, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def off(tiny_world, tmp_path_factory):
    with TestClient(create_app(_settings(tmp_path_factory.mktemp("ft"), tiny_world))) as c:
        wait_ready(c)
        yield c


def _wait(client, job_id: str, until=lambda j: j["status"] in ("succeeded", "failed", "canceled"), timeout=180):
    t0, seen = time.monotonic(), []
    while time.monotonic() - t0 < timeout:
        job = client.get(f"/v1/finetunes/{job_id}").json()
        seen.append(job)
        if until(job):
            return job, seen
        time.sleep(0.05)
    raise TimeoutError(seen[-1])


def test_readyz_and_identities_say_there_is_no_hypernet(off):
    d = off.get("/readyz").json()["details"]
    assert d["predictor"] == "none" and d["personalization"] == ["finetune"]
    assert "fine-tuning" in d["predictor_message"] and "/v1/finetunes" in d["predictor_message"]
    r = off.post("/v1/identities", files=photo_files(OBAMA[:2]))
    assert r.status_code == 409 and r.json()["error"]["code"] == "no_predictor"
    assert "/v1/finetunes" in r.json()["error"]["message"]


def test_finetune_makes_an_identity_that_changes_the_images(off):
    r = off.post("/v1/finetunes", files=photo_files(OBAMA[:3]), data={"name": "obama", "steps": "6"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] in ("queued", "running") and job["steps"] == 6 and job["start"] == "init"
    assert r.headers["location"] == f"/v1/finetunes/{job['id']}" and sum(p["accepted"] for p in job["photos"]) == 3
    done, seen = _wait(off, job["id"])
    assert done["status"] == "succeeded", done
    assert done["step"] == 6 and done["progress"] == 1.0 and np.isfinite(done["loss"])
    steps_seen = [j["step"] for j in seen]
    assert steps_seen == sorted(steps_seen)  # progress only moves forward
    ident = off.get(done["identity_url"]).json()
    assert ident["id"] == done["identity_id"] == identity_of(job["id"])
    assert ident["made_by"] == "fine-tune" and ident["predictor"] == "none" and ident["message"] is None
    assert ident["trigger"] == "sks person" and ident["photos_used"] == 3 and ident["name"] == "obama"
    assert off.get(ident["photos"][0]["face_url"]).status_code == 200
    gen = {"prompt": ident["prompt"], "seed": 11, "num_images": 1}
    base = off.post("/v1/generations", json=gen, headers={"Accept": "image/png"}).content
    mine = off.post("/v1/generations", json={**gen, "identity_id": ident["id"]}, headers={"Accept": "image/png"})
    zero = off.post("/v1/generations", json={**gen, "identity_id": ident["id"], "adapter_scale": 0},
                    headers={"Accept": "image/png"})  # fmt: skip
    assert mine.status_code == 200 and mine.content != base and zero.content == base
    from weights.formats.metadata import read_export_info
    from weights.safetensors_io import read_header

    d = off.get(f"/v1/identities/{ident['id']}/adapter", params={"format": "kohya"})
    path = off.app.state.svc.storage.root / "tmp-download.safetensors"
    path.write_bytes(d.content)
    info = read_export_info(read_header(path)[1])
    path.unlink()
    assert info.made_by.startswith("difflora fine-tune") and info.trigger == "sks person"


@pytest.mark.parametrize(
    "data, field",
    [({"steps": "0"}, "steps"), ({"steps": "41"}, "steps"), ({"steps": "x"}, "steps"), ({"start": "random"}, "start"),
     ({"start": "prediction"}, "start"), ({"name": "n" * 101}, "name")],
)  # fmt: skip
def test_bad_fields_are_named(off, data, field):
    r = off.post("/v1/finetunes", files=photo_files(OBAMA[:1]), data=data)
    assert r.status_code == 422, r.text
    assert any(d["field"].split(".")[-1] == field for d in r.json()["error"]["details"]), r.json()


def test_no_face_and_unknown_job(off):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (96, 96), (128, 128, 128)).save(buf, format="PNG")
    r = off.post("/v1/finetunes", files=[("photos", ("wall.png", buf.getvalue(), "image/png"))])
    assert r.status_code == 422 and r.json()["error"]["code"] == "no_usable_face"
    for method in ("get", "delete"):
        r = getattr(off, method)("/v1/finetunes/ftj_0123456789abcdef01234567")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert off.get("/v1/finetunes/../../etc").status_code == 404


def test_cancel_stores_nothing(off):
    job = off.post("/v1/finetunes", files=photo_files(OBAMA[:2]), data={"steps": "40"}).json()
    _wait(off, job["id"], until=lambda j: j["status"] == "running" and j["step"] >= 1)
    c = off.delete(f"/v1/finetunes/{job['id']}").json()
    assert c["status"] == "canceled"
    time.sleep(1.0)  # the training stops at its next step
    after = off.get(f"/v1/finetunes/{job['id']}").json()
    assert after["status"] == "canceled" and after["identity_id"] is None and after["step"] < 40
    assert off.get(f"/v1/identities/{identity_of(job['id'])}").status_code == 404
    # the next job still runs (the UNet was restored after the interrupted training)
    again = off.post("/v1/finetunes", files=photo_files(OBAMA[:2]), data={"steps": "2"}).json()
    assert _wait(off, again["id"])[0]["status"] == "succeeded"


def test_a_job_left_by_a_stopped_server_runs_after_the_restart(tiny_world, tmp_path):
    s = _settings(tmp_path, tiny_world, warmup=False)
    with TestClient(create_app(s)) as c:
        wait_ready(c)
        job = c.post("/v1/finetunes", files=photo_files(OBAMA[:2]), data={"steps": "6"}).json()
        _wait(c, job["id"], until=lambda j: j["step"] >= 1)
    # the server stopped mid-training: the job is queued again, then runs to the end on the next start
    with TestClient(create_app(s)) as c:
        wait_ready(c)
        done, _ = _wait(c, job["id"])
        assert done["status"] == "succeeded" and done["step"] == 6
        assert c.get(f"/v1/identities/{identity_of(job['id'])}").status_code == 200
        assert c.app.state.svc.storage.count_identities() == 1
        left = sorted(p.name for p in (tmp_path / "finetunes" / job["id"]).iterdir())
        assert left == ["job.json", "status.json"]  # the photos live on in the identity only


def test_with_a_trained_hypernet_auto_starts_from_the_prediction(client):
    """The module client of tests/service (the bundled trained hypernet): fine-tuning is offered there too."""
    assert client.get("/readyz").json()["details"]["personalization"] == ["predict", "finetune"]
    job = client.post("/v1/finetunes", files=photo_files(OBAMA[:2]), data={"steps": "2"}).json()
    assert job["start"] == "prediction"
    done, _ = _wait(client, job["id"])
    assert done["status"] == "succeeded"
    ident = client.get(done["identity_url"]).json()
    assert ident["made_by"] == "fine-tune" and ident["predictor"] == "trained"
