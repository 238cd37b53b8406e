"""The HTTP API on a fully loaded app (real tiny pipeline, real dlib, real hypernet) through Starlette's TestClient."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.service.conftest import ALEX, OBAMA, STEPS, photo_files
from tests.utils.faces import needs_faces

MISSING = "idt_" + "0" * 24


def _err(r, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) >= {"error"} and set(body["error"]) >= {"code", "message"}, body
    if code is not None:
        assert body["error"]["code"] == code, body
    assert "Traceback" not in r.text and str(Path(__file__).resolve().parents[3]) + "/" not in r.text
    return body["error"]


def test_health_ready_metrics(client):
    assert client.get("/healthz").json() == {"status": "ok", "details": {}}
    d = client.get("/readyz").json()["details"]
    assert d["face_backend"] == "dlib" and "warmup" in d["timings"]
    client.post("/v1/generations", json={"prompt": "x", "seed": 1})
    text = client.get("/metrics").text
    for name in (
        "difflora_http_requests_total",
        "difflora_queue_depth",
        "difflora_jobs",
        "difflora_step_seconds",
        "difflora_predict_seconds",
        "difflora_apply_seconds",
        "difflora_http_request_duration_seconds",
    ):
        assert name in text, name
    assert 'route="/v1/generations"' in text


def test_identity_created_and_readable(client, identity):
    assert identity["id"].startswith("idt_") and identity["name"] == "obama"
    assert identity["photos_used"] == 3 and identity["photos_rejected"] == 0
    assert identity["consistent"] and identity["consistency"] > 0.9
    assert identity["adapter"]["layers"] > 0 and identity["seconds"]["total"] > 0
    got = client.get(f"/v1/identities/{identity['id']}").json()
    assert got["photos"] == identity["photos"] and got["seconds"] == identity["seconds"]
    assert set(got["seconds"]) == {"faces", "predict", "store", "total"}
    face = client.get(identity["photos"][0]["face_url"])
    assert face.headers["content-type"] == "image/png" and Image.open(io.BytesIO(face.content)).size == (128, 128)


@needs_faces
def test_identity_reports_rejected_photos(client):
    files = photo_files(OBAMA[:2] + ALEX[:1]) + [("photos", ("../../etc/passwd", b"hello", "image/jpeg"))]
    body = client.post("/v1/identities", files=files).json()
    rows = body["photos"]
    assert [p["accepted"] for p in rows] == [True, True, False, False]
    assert rows[2]["code"] == "outlier" and "similarity" in rows[2]["reason"]
    assert rows[3]["code"] == "not_an_image" and rows[3]["filename"] == "passwd"
    stored = {p.name for p in (client.app.state.svc.storage.identity_dir(body["id"])).iterdir()}
    assert not any("passwd" in n for n in stored) and "adapter.safetensors" in stored


def test_identity_without_any_face(client):
    buf = io.BytesIO()
    Image.new("RGB", (96, 96), (128, 128, 128)).save(buf, format="PNG")
    err = _err(client.post("/v1/identities", files=[("photos", ("g.png", buf.getvalue(), "image/png"))]), 422,
               "no_usable_face")  # fmt: skip
    assert err["details"][0]["accepted"] is False and err["details"][0]["code"]


@pytest.mark.parametrize(
    "method,path,kw,status,code",
    [
        ("get", f"/v1/identities/{MISSING}", {}, 404, "not_found"),
        ("get", "/v1/identities/..%2F..%2Fetc%2Fpasswd", {}, 404, "not_found"),
        ("delete", f"/v1/identities/{MISSING}", {}, 404, "not_found"),
        ("get", f"/v1/identities/{MISSING}/adapter", {}, 404, "not_found"),
        ("post", "/v1/generations", {"json": {"prompt": ""}}, 422, "invalid_request"),
        ("post", "/v1/generations", {"json": {"prompt": "x", "steps": 101}}, 422, "limit_exceeded"),
        ("post", "/v1/generations", {"json": {"prompt": "x", "width": 63}}, 422, "invalid_request"),
        ("post", "/v1/generations", {"json": {"prompt": "x", "width": 512}}, 422, "limit_exceeded"),
        ("post", "/v1/generations", {"json": {"prompt": "x", "num_images": 5}}, 422, "limit_exceeded"),
        ("post", "/v1/generations", {"json": {"prompt": "x", "scheduler": "evil"}}, 422, "invalid_request"),
        ("post", "/v1/generations", {"json": {"prompt": "x", "seed": -1}}, 422, "invalid_request"),
        ("post", "/v1/generations", {"json": {"prompt": "x", "bogus": 1}}, 422, "invalid_request"),
        ("post", "/v1/generations", {"json": {"prompt": "x", "identity_id": MISSING}}, 404, "not_found"),
        ("post", "/v1/generations", {"content": b"{", "headers": {"content-type": "application/json"}}, 422, None),
        ("post", "/v1/jobs", {"json": {"identity_ids": [MISSING], "prompts": ["x"]}}, 404, "not_found"),
        ("post", "/v1/jobs", {"json": {"identity_ids": [], "prompts": ["x"]}}, 422, "invalid_request"),
        ("get", "/v1/jobs/job_nope", {}, 404, "not_found"),
        ("get", "/nope", {}, 404, "not_found"),
        ("put", "/v1/generations", {}, 405, "method_not_allowed"),
        ("post", "/v1/identities", {"data": {"name": "x"}}, 422, "invalid_request"),  # "photos: Field required"
        ("post", "/v1/generations", {"json": {"prompt": "x", "steps": "3"}}, 422, "invalid_request"),
        ("post", "/v1/generations", {"json": {"prompt": "x", "steps": True}}, 422, "invalid_request"),
        ("post", "/v1/generations", {"json": {"prompt": "x", "seed": 1.5}}, 422, "invalid_request"),
        (
            "post",
            "/v1/jobs",
            {"json": {"identity_ids": [MISSING], "prompts": ["x"]}, "headers": {"Idempotency-Key": ""}},
            422,
            "invalid_request",
        ),
        pytest.param(
            "post", "/v1/identities", {"files": photo_files(OBAMA[:1] * 11)}, 422, "too_many_photos", marks=needs_faces
        ),
    ],
)
def test_errors(client, method, path, kw, status, code):
    _err(getattr(client, method)(path, **kw), status, code)


def test_adapter_format_is_validated(client, identity):
    r = client.get(f"/v1/identities/{identity['id']}/adapter", params={"format": "ckpt"})
    _err(r, 422, "invalid_request")
    assert r.json()["error"]["details"][0]["field"] == "query.format"


def test_generate_png_is_deterministic_and_json_returns_seeds(client, identity):
    req = {"identity_id": identity["id"], "prompt": "a photo of sks person", "seed": 7}
    a = client.post("/v1/generations", json=req, headers={"Accept": "image/png"})
    b = client.post("/v1/generations", json=req, headers={"Accept": "image/png"})
    assert a.status_code == 200 and a.headers["content-type"] == "image/png" and a.headers["x-seed"] == "7"
    assert a.content == b.content
    j = client.post("/v1/generations", json={**req, "num_images": 2}).json()
    assert [im["seed"] for im in j["images"]] == [7, 8] and j["info"]["steps"] == STEPS
    batched = np.asarray(Image.open(io.BytesIO(base64.b64decode(j["images"][0]["png_base64"]))), np.int16)
    alone = np.asarray(Image.open(io.BytesIO(a.content)), np.int16)
    assert np.abs(batched - alone).mean() < 1.0  # image 0 of a batch = the same seed alone (up to batched rounding)
    r = client.post("/v1/generations", json={"prompt": "x"}).json()
    assert isinstance(r["seed"], int) and r["info"]["identity_id"] is None
    _err(client.post("/v1/generations", json={**req, "num_images": 2}, headers={"Accept": "image/png"}), 406)


def test_adapter_scale_zero_is_the_base_model(client, identity):
    """Scale 0 restores the exact original weights: same bytes as a base-model request (after an identity ran)."""
    req = {"prompt": "a photo of a person", "seed": 3}
    client.post("/v1/generations", json={**req, "identity_id": identity["id"]})
    zero = client.post("/v1/generations", json={**req, "identity_id": identity["id"], "adapter_scale": 0},
                       headers={"Accept": "image/png"})  # fmt: skip
    base = client.post("/v1/generations", json=req, headers={"Accept": "image/png"})
    assert zero.content == base.content


@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "peft", "native"])
def test_adapter_download(client, identity, fmt, tmp_path):
    from weights.io import export_info, load_any

    r = client.get(f"/v1/identities/{identity['id']}/adapter", params={"format": fmt})
    assert r.status_code == 200 and identity["id"] in r.headers["content-disposition"]
    if fmt == "peft":
        with zipfile.ZipFile(io.BytesIO(r.content)) as z:
            assert sorted(z.namelist()) == ["adapter_config.json", "adapter_model.safetensors"]
            z.extractall(tmp_path / "peft")
        path = tmp_path / "peft"
    else:
        path = tmp_path / f"a-{fmt}.safetensors"
        path.write_bytes(r.content)
    adapter = load_any(path)
    assert len(adapter.spec.layers) == identity["adapter"]["layers"]
    info = export_info(path)  # the file tells LoRA tools how to prompt it
    assert identity["trigger"] == info.trigger == "sks person" and identity["prompt"] == "a photo of sks person"
    assert info.title == "obama" and info.num_images == identity["photos_used"] and info.arch == "sd15"
    assert identity["downloads"][fmt] == f"/v1/identities/{identity['id']}/adapter?format={fmt}"


def test_jobs_idempotency_and_results(client, identity):
    req = {"identity_ids": [identity["id"]], "prompts": ["a", "b"], "num_images": 2, "seed": 5}
    hdr = {"Idempotency-Key": "test-key-1"}
    first = client.post("/v1/jobs", json=req, headers=hdr)
    assert first.status_code == 202 and first.json()["total"] == 2
    again = client.post("/v1/jobs", json=req, headers=hdr)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    _err(client.post("/v1/jobs", json={**req, "seed": 6}, headers=hdr), 409, "idempotency_mismatch")
    jid = first.json()["id"]
    deadline = time.monotonic() + 120
    while (job := client.get(f"/v1/jobs/{jid}").json())["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert job["status"] == "succeeded" and job["done"] == 2 and job["progress"] == 1.0
    res = client.get(f"/v1/jobs/{jid}/results").json()["results"]
    seeds = [im["seed"] for it in res for im in it["images"]]
    assert seeds == [5, 6, 7, 8]
    png = client.get(res[1]["images"][0]["url"])
    assert png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    assert client.delete(f"/v1/jobs/{jid}").json()["status"] == "succeeded"  # finished jobs stay finished


def test_cancel_job(client, identity):
    req = {"identity_ids": [identity["id"]], "prompts": [f"p{i}" for i in range(30)]}
    jid = client.post("/v1/jobs", json=req).json()["id"]
    assert client.delete(f"/v1/jobs/{jid}").json()["status"] == "canceled"
    time.sleep(0.5)
    job = client.get(f"/v1/jobs/{jid}").json()
    assert job["status"] == "canceled" and job["done"] < 30


@needs_faces
def test_delete_identity(client):
    ident = client.post("/v1/identities", files=photo_files(OBAMA[3:4])).json()
    iid = ident["id"]
    assert client.post("/v1/generations", json={"identity_id": iid, "prompt": "x"}).status_code == 200
    assert client.delete(f"/v1/identities/{iid}").status_code == 204
    _err(client.get(f"/v1/identities/{iid}"), 404, "not_found")
    _err(client.post("/v1/generations", json={"identity_id": iid, "prompt": "x"}), 404, "not_found")
    assert iid not in client.app.state.svc.engine.cached()


def test_openapi_and_web_page(client):
    spec = client.get("/openapi.json").json()
    for path in ("/v1/identities", "/v1/generations", "/v1/jobs", "/v1/jobs/{job_id}/results", "/readyz"):
        assert path in spec["paths"], path
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "<html" in page.text.lower()


def test_full_queue_is_429_with_retry_after(client):
    from service.engine import GenParams

    eng = client.app.state.svc.engine
    busy = eng.submit_generate(None, GenParams(steps=15, width=64, height=64), ["busy"], [0])
    time.sleep(0.2)  # the worker takes it
    queued = [
        eng.submit_generate(None, GenParams(steps=1, width=16, height=16), ["q"], [i]) for i in range(eng.queue_size)
    ]
    r = client.post("/v1/generations", json={"prompt": "x"})
    err = _err(r, 429, "queue_full")
    assert int(r.headers["retry-after"]) >= 1 and "queue" in err["message"]
    for f in [busy, *queued]:
        f.result(timeout=120)
    assert client.post("/v1/generations", json={"prompt": "x"}).status_code == 200
    assert "difflora_queue_rejected_total 1.0" in client.get("/metrics").text


@needs_faces
def test_every_422_names_its_field(client):
    """Limit errors carry ``details`` like validation errors; a JSON syntax error points at the body."""
    for kw, field in (
        ({"json": {"prompt": "x", "num_images": 5}}, "num_images"),
        ({"json": {"prompt": "x", "steps": 101}}, "steps"),
        ({"content": b'{"prompt": "x",', "headers": {"content-type": "application/json"}}, "body"),
    ):
        err = _err(client.post("/v1/generations", **kw), 422)
        assert err["details"][0]["field"] == field, err
    err = _err(
        client.post("/v1/generations", content=b'{"prompt": "x",', headers={"content-type": "application/json"}), 422
    )
    assert "character 15" in err["message"]
    err = _err(client.post("/v1/identities", files=photo_files(OBAMA[:1] * 11)), 422, "too_many_photos")
    assert err["details"] == [{"field": "photos", "message": "at most 10 photos per identity, got 11"}]


def test_job_image_limit_counts_images(client, identity):
    req = {"identity_ids": [identity["id"]], "prompts": [f"p{i}" for i in range(501)], "num_images": 2}
    err = _err(client.post("/v1/jobs", json=req), 422, "limit_exceeded")
    assert "at most 1000 images, this one 1002" in err["message"] and err["details"]


def test_scheduler_minimum_steps(client):
    """PNDM's Runge-Kutta warm-up needs pndm_order (4) steps with the tiny model's config: fewer is a 422 naming
    ``steps``, not a 500 from inside diffusers, for a request and for a job."""
    least = client.app.state.svc.engine.min_steps("pndm")
    assert least == 4
    req = {"prompt": "x", "seed": 1, "scheduler": "pndm"}
    err = _err(client.post("/v1/generations", json={**req, "steps": least - 1}), 422, "invalid_request")
    assert err["details"][0]["field"] == "steps" and "pndm" in err["message"]
    assert client.post("/v1/generations", json={**req, "steps": least}).status_code == 200
    assert client.post("/v1/generations", json={**req, "steps": 1, "scheduler": "euler"}).status_code == 200
    job = {"identity_ids": [MISSING], "prompts": ["x"], "settings": {"steps": 2, "scheduler": "pndm"}}
    _err(client.post("/v1/jobs", json=job), 422, "invalid_request")


def test_accept_quality_values_and_head(client):
    req = {"prompt": "x", "seed": 3}
    r = client.post("/v1/generations", json=req, headers={"Accept": "image/png;q=0.1, application/json"})
    assert r.headers["content-type"] == "application/json"
    r = client.post("/v1/generations", json=req, headers={"Accept": "application/json;q=0.5, image/png"})
    assert r.headers["content-type"] == "image/png"
    assert client.head("/").status_code == 200


def test_job_that_no_longer_fits_the_limits_fails_and_the_next_runs(client, identity):
    """A job stored with settings beyond today's limits (queued before a restart with a lower max_steps) ends
    ``failed`` with the reason on the job and every item; the runner goes on to the next job."""
    from service.jobs import job_items, request_hash
    from service.schemas import JobRequest
    from service.storage import new_id

    state = client.app.state.svc
    stale = JobRequest(identity_ids=[identity["id"]], prompts=["a", "b"], settings={"steps": 500})
    jid, _ = state.storage.create_job(
        new_id("job"), stale.model_dump(mode="json"), request_hash(stale), job_items(stale), None
    )
    later = client.post("/v1/jobs", json={"identity_ids": [identity["id"]], "prompts": ["c"]}).json()["id"]
    deadline = time.monotonic() + 120
    while client.get(f"/v1/jobs/{later}").json()["status"] != "succeeded":
        assert time.monotonic() < deadline, client.get(f"/v1/jobs/{jid}").json()
        time.sleep(0.1)
    job = client.get(f"/v1/jobs/{jid}").json()
    assert job["status"] == "failed" and job["failed"] == 2 and "steps: at most 100" in job["error"]
    items = client.get(f"/v1/jobs/{jid}/results").json()["results"]
    assert [it["status"] for it in items] == ["failed", "failed"] and "steps" in items[0]["error"]


@needs_faces
def test_identity_deleted_while_its_request_waits_is_404(client):
    """The adapter is read from disk when the request reaches the worker; if the identity was deleted meanwhile the
    request gets 404, not a 500."""
    import threading

    from service.engine import GenParams

    iid = client.post("/v1/identities", files=photo_files(OBAMA[4:5])).json()["id"]
    eng = client.app.state.svc.engine
    eng.forget(iid)  # not cached: the worker will load it from disk
    busy = eng.submit_generate(None, GenParams(steps=60, width=128, height=128), ["busy"], [0])  # seconds
    deadline = time.monotonic() + 30
    while eng.queue_depth:  # the worker has taken the busy task
        assert time.monotonic() < deadline
        time.sleep(0.01)
    out = {}

    def post() -> None:
        out["r"] = client.post("/v1/generations", json={"identity_id": iid, "prompt": "x"})

    t = threading.Thread(target=post)
    t.start()
    while eng.queue_depth == 0:  # now the only queued task is this request, behind the busy one
        assert time.monotonic() < deadline and not busy.done()
        time.sleep(0.01)
    assert client.delete(f"/v1/identities/{iid}").status_code == 204
    busy.result(timeout=120)
    t.join(timeout=120)
    assert "deleted" in _err(out["r"], 404, "not_found")["message"]


@needs_faces
def test_large_photos_are_downscaled_when_decoded(client):
    state = client.app.state.svc
    old, state.settings.max_image_side = state.settings.max_image_side, 400
    try:
        body = client.post("/v1/identities", files=photo_files([p for p in OBAMA if "1080" in p.name])).json()
    finally:
        state.settings.max_image_side = old
    assert body["photos_used"] == 1, body
    with Image.open(state.storage.identity_dir(body["id"]) / "photo-0.jpg") as im:
        assert max(im.size) == 400


@needs_faces
def test_uploads_beyond_the_pending_cap_are_429_and_the_count_is_released(client):
    state = client.app.state.svc
    state.uploads = state.settings.max_pending_uploads
    try:
        r = client.post("/v1/identities", files=photo_files(OBAMA[:1]))
    finally:
        state.uploads = 0
    assert "uploads" in _err(r, 429, "queue_full")["message"] and r.headers["retry-after"] == "2"
    buf = io.BytesIO()
    Image.new("RGB", (96, 96), (128, 128, 128)).save(buf, format="PNG")
    _err(client.post("/v1/identities", files=[("photos", ("g.png", buf.getvalue(), "image/png"))]), 422)
    assert client.post("/v1/identities", files=photo_files(OBAMA[:1])).status_code == 201
    assert state.uploads == 0  # released after a rejected and an accepted upload


# ---- X-Request-ID -------------------------------------------------------------------------------------------------
def test_request_id_is_generated_or_echoed_and_in_error_bodies(client):
    a, b = client.get("/healthz"), client.get("/healthz")
    assert re.fullmatch(r"req_[0-9a-f]{24}", a.headers["x-request-id"]) and a.headers["x-request-id"] != b.headers[
        "x-request-id"]  # fmt: skip
    given = "trace-1.a_b:C"
    assert client.get("/healthz", headers={"X-Request-ID": given}).headers["x-request-id"] == given
    for r in (
        client.get(f"/v1/identities/{MISSING}", headers={"X-Request-ID": given}),  # 404
        client.post("/v1/generations", json={"prompt": 3}, headers={"X-Request-ID": given}),  # 422
    ):
        assert r.headers["x-request-id"] == given and r.json()["error"]["request_id"] == given, r.text
    r = client.post("/v1/generations", json={"prompt": 3})
    assert r.json()["error"]["request_id"] == r.headers["x-request-id"]


@pytest.mark.parametrize(
    "headers",
    [
        [("X-Request-ID", "has space")],
        [("X-Request-ID", "x" * 129)],
        [("X-Request-ID", "")],
        [("X-Request-ID", "a,b")],
        [("X-Request-ID", 'quote"d')],
        [(b"X-Request-ID", b"caf\xe9")],  # not ASCII
        [("X-Request-ID", "one"), ("X-Request-ID", "two")],
    ],
)
def test_bad_request_ids_are_422_naming_the_header(client, headers):
    r = client.get("/healthz", headers=headers)
    err = _err(r, 422, "invalid_request")
    assert err["message"].startswith("X-Request-ID: ") and err["details"][0]["field"] == "X-Request-ID"
    assert re.fullmatch(r"req_[0-9a-f]{24}", r.headers["x-request-id"]) and err["request_id"] == r.headers[
        "x-request-id"]  # fmt: skip


def test_request_id_is_in_the_logs(client, caplog):
    from service.request_id import install_log_filter

    caplog.set_level(logging.INFO, logger="difflora.access")
    install_log_filter([caplog.handler])
    client.get(f"/v1/jobs/{MISSING}", headers={"X-Request-ID": "log-me-7"})
    lines = [r for r in caplog.records if r.name == "difflora.access" and f"/v1/jobs/{MISSING}" in r.getMessage()]
    assert [(r.request_id, r.getMessage().split()[-2]) for r in lines] == [("log-me-7", "404")]


# ---- GET /v1/jobs/{id}/events -------------------------------------------------------------------------------------
def _events(lines) -> list[tuple[str, dict | None]]:
    """(event, data) per SSE event of a line iterator; (":", None) per comment line."""
    out, event, data = [], None, None
    for line in lines:
        if line.startswith(":"):
            out.append((":", None))
        elif line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
        elif line == "" and event is not None:
            out.append((event, data))
            event = data = None
    return out


def test_job_events_stream_progress_until_the_end(client, identity):
    s = client.app.state.svc.settings
    old = s.job_events_poll_s, s.job_events_keepalive_s
    s.job_events_poll_s, s.job_events_keepalive_s = 0.02, 0.01  # each item takes several polls: keep-alives
    try:
        req = {"identity_ids": [identity["id"]], "prompts": ["a", "b", "c"], "num_images": 2, "seed": 9}
        jid = client.post("/v1/jobs", json=req).json()["id"]
        with client.stream("GET", f"/v1/jobs/{jid}/events") as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["cache-control"] == "no-cache" and r.headers["x-request-id"]
            events = _events(r.iter_lines())
    finally:
        s.job_events_poll_s, s.job_events_keepalive_s = old
    named = [(e, d) for e, d in events if e != ":"]
    assert [e for e, _ in named] == ["progress"] * (len(named) - 1) + ["end"]
    done = [d["done"] for _, d in named]
    assert done == sorted(done) and len(set(done)) == len(done)  # one event per change, none repeated
    assert named[-1][1]["status"] == "succeeded" and named[-1][1]["done"] == 3 and named[-1][1]["id"] == jid
    assert named[-1][1] == client.get(f"/v1/jobs/{jid}").json()
    assert (":", None) in events  # keep-alive comments while an item runs
    # a finished job: one end event at once
    with client.stream("GET", f"/v1/jobs/{jid}/events") as r:
        assert [e for e, _ in _events(r.iter_lines())] == ["end"]
    _err(client.get(f"/v1/jobs/{'job_' + '0' * 24}/events"), 404, "not_found")
    assert client.app.state.svc.event_streams == 0


def test_job_events_end_when_the_client_leaves_and_are_capped(client, identity):
    st = client.app.state.svc
    old = st.settings.max_event_streams
    st.settings.max_event_streams = 1
    try:
        jid = client.post("/v1/jobs", json={"identity_ids": [identity["id"]], "prompts": ["p"] * 20}).json()["id"]
        with client.stream("GET", f"/v1/jobs/{jid}/events") as r:
            it = r.iter_lines()  # kept: a dropped line iterator closes the response
            assert next(it) == "event: progress" and st.event_streams == 1
            _err(client.get(f"/v1/jobs/{jid}/events"), 429, "too_many_streams")
        deadline = time.monotonic() + 10
        while st.event_streams and time.monotonic() < deadline:  # the client left: the stream ended
            time.sleep(0.05)
        assert st.event_streams == 0
    finally:
        st.settings.max_event_streams = old
        client.delete(f"/v1/jobs/{jid}")


def test_web_page_follows_jobs_with_server_sent_events(client):
    js = client.get("/static/app.js").text
    assert "new EventSource(`/v1/jobs/${job.id}/events`)" in js and "pollJob(job, show)" in js
