"""API key, body-size cap, error shape and not-ready answers: the HTTP layer alone (``load=False``: no models)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings

KEY = "s3cret-key-123"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    s = Settings(data_dir=tmp_path_factory.mktemp("g"), api_key=KEY, max_body_bytes=4096, warmup=False)
    app = create_app(s, load=False)

    def boom():
        raise RuntimeError("secret detail in /srv/difflora/data")

    app.add_api_route("/v1/boom", boom)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize(
    "headers,status",
    [({}, 401), ({"X-API-Key": "wrong"}, 401), ({"X-API-Key": KEY[:-1]}, 401), ({"X-API-Key": KEY + "x"}, 401),
     ({"Authorization": "Bearer wrong"}, 401), ({"X-API-Key": KEY}, 404), ({"Authorization": f"Bearer {KEY}"}, 404)],
)  # fmt: skip
def test_api_key(guarded, headers, status):
    r = guarded.get("/v1/identities/idt_" + "0" * 24, headers=headers)
    assert r.status_code == status
    assert set(r.json()["error"]) == {"code", "message", "request_id"}
    if status == 401:
        assert r.headers["www-authenticate"].startswith("ApiKey")


@pytest.mark.parametrize("path", ["/metrics", "/openapi.json", "/docs", "/v1/jobs/job_x", "/nope"])
def test_everything_but_health_needs_the_key(guarded, path):
    assert guarded.get(path).status_code == 401


def test_health_and_page_are_public(guarded):
    assert guarded.get("/healthz").status_code == 200
    r = guarded.get("/readyz")
    assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
    assert guarded.get("/").status_code == 200


def test_not_ready_is_503(guarded):
    r = guarded.post("/v1/generations", json={"prompt": "x"}, headers={"X-API-Key": KEY})
    assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready" and r.headers["retry-after"]


def test_body_cap_by_content_length(guarded):
    r = guarded.post("/v1/identities", files=[("photos", ("a.jpg", b"x" * 10_000, "image/jpeg"))],
                     headers={"X-API-Key": KEY})  # fmt: skip
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize("path", ["/v1/identities", "/v1/generations", "/v1/jobs"])
def test_body_cap_when_streamed_without_length(guarded, path):
    """A chunked body with no Content-Length is counted while it streams in and cut at the cap."""

    def chunks():
        for _ in range(20):
            yield b"y" * 1024

    hdr = {
        "X-API-Key": KEY,
        "content-type": "multipart/form-data; boundary=zzz" if "ident" in path else "application/json",
    }
    r = guarded.post(path, content=chunks(), headers=hdr)
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "payload_too_large"


def test_bad_content_length(guarded):
    r = guarded.post("/v1/jobs", content=b"{}", headers={"X-API-Key": KEY, "content-length": "abc"})
    assert r.status_code == 400


def test_unauthenticated_upload_is_refused_before_the_body(guarded):
    r = guarded.post("/v1/identities", files=[("photos", ("a.jpg", b"x" * 100, "image/jpeg"))])
    assert r.status_code == 401


def test_cors_off_by_default(guarded):
    r = guarded.options(
        "/v1/generations", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in r.headers


def test_unhandled_error_is_a_generic_500(guarded):
    r = guarded.get("/v1/boom", headers={"X-API-Key": KEY, "X-Request-ID": "boom-1"})
    assert r.status_code == 500 and r.headers["x-request-id"] == "boom-1"
    assert r.json() == {"error": {"code": "internal", "message": "internal server error", "request_id": "boom-1"}}


@pytest.mark.parametrize("headers, status", [({}, 401), ({"X-API-Key": KEY, "Content-Length": "999999"}, 413)])
def test_guard_answers_carry_the_request_id(guarded, headers, status):
    r = guarded.post("/v1/generations", headers={**headers, "X-Request-ID": "guard-2"})
    assert r.status_code == status and r.headers["x-request-id"] == "guard-2"
    assert r.json()["error"]["request_id"] == "guard-2"
