"""Security of the HTTP surface with an API key set: who needs the key (enumerated from the app's own routes),
constant-time comparison, CORS off by default, error bodies without internals, no server path or URL inputs."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest
from starlette.routing import Mount, Route

from service import middleware, tenants
from service.routes.web import STATIC_DIR
from tests.reliability.conftest import AUTH, KEY
from tests.reliability.corpus import face_jpeg
from tests.utils.faces import require_faces

PUBLIC = {"/healthz", "/readyz", "/"}  # + every file under /static/: the web page and its assets
CHECKOUT = Path(__file__).resolve().parents[2]  # this clone; error bodies must not name it (or its parent)
SERVER_PATH = re.compile(
    rf"({re.escape(str(CHECKOUT.parent))}/|/tmp/|/srv/|/home/|site-packages|Traceback|File \"|\.py\b)"
)
NO_KEY_VARIANTS = [
    {},
    {"X-API-Key": ""},
    {"X-API-Key": KEY[:-1]},
    {"X-API-Key": KEY.upper()},
    {"Authorization": f"Basic {KEY}"},
    {"Authorization": "Bearer "},
    {"x-api-key": KEY + " "},
]


@pytest.fixture(scope="module")
def ids(rel_app) -> dict:
    """Real ids to fill path parameters: an identity and a finished batch job."""
    require_faces()
    client, _ = rel_app
    r = client.post("/v1/identities", files=[("photos", ("a.jpg", face_jpeg(), "image/jpeg"))], headers=AUTH)
    assert r.status_code == 201, r.text
    idt = r.json()["id"]
    r = client.post("/v1/jobs", json={"identity_ids": [idt], "prompts": ["a photo"], "settings": {"steps": 1}},
                    headers=AUTH)  # fmt: skip
    assert r.status_code in (200, 202), r.text
    return {"identity_id": idt, "job_id": r.json()["id"], "index": "0", "idx": "0", "k": "0", "item": "0"}


def _routes(routes, prefix: str = ""):
    """(path, methods | None) of every route, descending into included routers (FastAPI >= 0.16x wraps them in
    ``_IncludedRouter``; older versions flatten them into ``app.routes``). ``None`` methods: a mount."""
    for route in routes:
        if isinstance(route, Mount):
            yield prefix + route.path, None
        elif isinstance(route, Route):
            yield prefix + route.path, route.methods - {"HEAD"}
        elif hasattr(route, "original_router"):
            yield from _routes(route.original_router.routes, prefix + getattr(route.include_context, "prefix", ""))


def _requests(app, ids: dict) -> list[tuple[str, str]]:
    """(method, concrete path) for every route of the app; static files enumerated from the folder."""
    out = []
    for template, methods in _routes(app.routes):
        if methods is None:
            out += [("GET", f"{template}/{f.name}") for f in sorted(STATIC_DIR.iterdir()) if f.is_file()]
            continue
        path = re.sub(r"\{(\w+)(:\w+)?\}", lambda m: ids.get(m.group(1), "0"), template)
        for method in sorted(methods):
            if method == "DELETE":  # never delete the real ones: an unknown id still exercises auth
                path = re.sub(r"(idt|job)_[0-9a-f]{24}", lambda m: m.group(1) + "_" + "f" * 24, path)
            out.append((method, path))
    return out


def _is_public(path: str) -> bool:
    return path in PUBLIC or path.startswith("/static/")


def test_routes_are_enumerated_from_the_app(rel_app, ids):
    app = rel_app[0].app
    reqs = _requests(app, ids)
    templates = {(m, p) for p, ms in _routes(app.routes) for m in ms or ()}
    schema_ops = {(m.upper(), p) for p, ops in app.openapi()["paths"].items() for m in ops}
    assert schema_ops <= templates, schema_ops - templates  # the walk sees every documented operation
    assert len(reqs) >= 15 and ("POST", "/v1/identities") in reqs and ("GET", "/metrics") in reqs
    assert {p for _, p in reqs if _is_public(p)} >= PUBLIC | {"/static/app.js", "/static/index.html"}


def test_every_route_but_health_and_page_needs_the_key(rel_app, ids):
    client = rel_app[0]
    refused, open_without_key = [], set()
    for method, path in _requests(client.app, ids):
        r = client.request(method, path)
        assert r.status_code < 500, (method, path, r.text)
        if r.status_code == 401:
            assert r.json()["error"]["code"] == "unauthorized" and r.headers["www-authenticate"].startswith("ApiKey")
            refused.append((method, path))
            for hdr in NO_KEY_VARIANTS[1:]:  # a wrong, empty, truncated or mis-sent key is no better
                assert client.request(method, path, headers=hdr).status_code == 401, (method, path, hdr)
        else:
            open_without_key.add(path)
        with_key = client.request(method, path, headers=AUTH)
        assert with_key.status_code not in (401, 403) and with_key.status_code < 500, (method, path, with_key.text)
        if method == "GET" and not path.startswith(("/v1/jobs/", "/v1/finetunes/")):  # no fine-tune exists here
            assert with_key.status_code == 200, (method, path, with_key.text)  # the key really opens the route
    assert {p for p in open_without_key if not p.startswith("/static/")} == PUBLIC
    assert all(_is_public(p) for p in open_without_key)
    assert len(refused) >= 10
    for path in ("/nope", "/v1/identities/../healthz", "/static/../openapi.json", "/docs", "/openapi.json"):
        assert client.get(path).status_code in (401, 404), path  # unknown paths do not leak existence


def test_key_comparison_is_constant_time(rel_app, monkeypatch):
    """The key is hashed and its digest compared with every stored digest by hmac.compare_digest (one key
    configured here: one comparison per request), never with ``==``."""
    client = rel_app[0]
    calls = []
    real = tenants.hmac.compare_digest

    def spy(a, b):
        calls.append((type(a), len(a), type(b), len(b)))
        return real(a, b)

    monkeypatch.setattr(tenants.hmac, "compare_digest", spy)
    assert client.get("/metrics", headers={"X-API-Key": "wrong"}).status_code == 401
    assert client.get("/metrics", headers=AUTH).status_code == 200
    assert client.get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert calls == [(bytes, 32, bytes, 32)] * 3  # SHA-256 digests, whatever the length of what was sent
    src = inspect.getsource(tenants.KeyRing.authenticate) + inspect.getsource(middleware.GuardMiddleware)
    assert "compare_digest" in src and not re.search(r"(==|!=)\s*(stored|digest)\b|\b(stored|digest)\s*(==|!=)", src)


@pytest.mark.parametrize("method", ["GET", "OPTIONS"])
def test_cors_is_off_by_default(rel_app, method):
    hdr = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "x-api-key", **AUTH}  # fmt: skip
    r = rel_app[0].request(method, "/v1/identities/idt_" + "0" * 24, headers=hdr)
    assert not any(h.lower().startswith("access-control-") for h in r.headers), dict(r.headers)


FOUR_XX = [
    ("GET", "/v1/identities/idt_" + "0" * 24, {}, 404),
    ("GET", "/v1/identities/..%2F..%2Fetc%2Fpasswd", {}, 404),
    ("GET", "/v1/jobs/job_nope/results/0/0.png", {}, 404),
    ("PUT", "/v1/identities", {}, 405),
    ("POST", "/v1/generations", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 422),
    ("POST", "/v1/generations", {"json": {"prompt": "x", "steps": 10**9}}, 422),
    ("POST", "/v1/jobs", {"json": {"identity_ids": ["../../etc"], "prompts": ["x"]}}, 404),
    ("GET", "/v1/identities/idt_" + "0" * 24 + "/adapter?format=pickle", {}, 422),
    ("POST", "/v1/generations", {"content": b"x" * 5_000_000, "headers": {"content-type": "application/json"}}, 413),
]


@pytest.mark.parametrize("method,path,kw,status", FOUR_XX, ids=[f"{m} {p[:40]} {s}" for m, p, _, s in FOUR_XX])
def test_4xx_bodies_carry_no_internals(rel_app, method, path, kw, status):
    kw = {**kw, "headers": {**AUTH, **kw.get("headers", {})}}
    r = rel_app[0].request(method, path, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] and err["message"]
    assert not SERVER_PATH.search(r.text), r.text


def test_forced_500_is_generic(rel_app, monkeypatch):
    """A real route whose storage call blows up with a message full of server internals."""
    client, data = rel_app
    svc = client.app.state.svc

    def boom(*a, **k):
        raise RuntimeError(f"database is locked at {data}/difflora.sqlite3 (see {CHECKOUT}/service/storage.py)")

    monkeypatch.setattr(svc.storage, "get_identity", boom)
    r = client.get("/v1/identities/idt_" + "1" * 24, headers=AUTH)
    assert r.status_code == 500
    rid = r.headers["x-request-id"]
    assert r.json() == {"error": {"code": "internal", "message": "internal server error", "request_id": rid}}
    assert not SERVER_PATH.search(r.text) and str(data) not in r.text


SUSPECT_NAME = re.compile(r"(path|url|uri|dir|folder|file|location|href|src|source|load|model)", re.I)


def _walk(schema, components: dict, seen: set, out: list, where: str) -> None:
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if ref:
            name = ref.rsplit("/", 1)[-1]
            if name not in seen:
                seen.add(name)
                _walk(components[name], components, seen, out, name)
            return
        if schema.get("format") in ("uri", "url", "path"):
            out.append((where, schema.get("format")))
        for prop, sub in (schema.get("properties") or {}).items():
            binary = isinstance(sub, dict) and (sub.get("format") == "binary" or
                                                sub.get("items", {}).get("format") == "binary")  # fmt: skip
            if SUSPECT_NAME.search(prop) and not binary:
                out.append((f"{where}.{prop}", "name"))
            _walk(sub, components, seen, out, f"{where}.{prop}")
        for k in ("items", "anyOf", "oneOf", "allOf", "additionalProperties"):
            v = schema.get(k)
            for sub in v if isinstance(v, list) else [v]:
                _walk(sub, components, seen, out, where)


def test_no_endpoint_takes_a_server_path_or_url(rel_app):
    spec = rel_app[0].get("/openapi.json", headers=AUTH).json()
    comps = spec.get("components", {}).get("schemas", {})
    found: list = []
    n_inputs = 0
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            for p in op.get("parameters", []):
                n_inputs += 1
                if SUSPECT_NAME.search(p["name"]):
                    found.append((f"{method} {path} {p['in']}:{p['name']}", "name"))
                _walk(p.get("schema", {}), comps, set(), found, f"{method} {path} {p['name']}")
            for media in (op.get("requestBody") or {}).get("content", {}).values():
                n_inputs += 1
                _walk(media.get("schema", {}), comps, set(), found, f"{method} {path} body")
    assert n_inputs >= 10, "the schema lists no inputs: the check would be vacuous"
    assert not found, json.dumps(found, indent=1)
