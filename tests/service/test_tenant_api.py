"""Tenants, lists, Idempotency-Key on identities, deletion and retention over HTTP, on the real tiny pipeline.

One app with a keys file (alice, bob, an admin ``ops``) plus the shared ``api_key`` (tenant ``default``). Every
route that takes an id is tried with another tenant's id (table-driven): the answer is the 404 of a missing id, and
the owner's data is untouched."""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.service.conftest import OBAMA, STEPS, photo_files, wait_ready

KEYS = {"alice": "alice-key-0123456789abcdef", "bob": "bob-key-0123456789abcdef", "ops": "ops-key-0123456789abcdef"}
SHARED = "shared-key-0123456789"
MISSING_IDT, MISSING_JOB, MISSING_FTJ = "idt_" + "0" * 24, "job_" + "0" * 24, "ftj_" + "0" * 24
MISSING = {"idt": MISSING_IDT, "job": MISSING_JOB, "ftj": MISSING_FTJ}


def h(who: str) -> dict:
    return {"X-API-Key": SHARED if who == "default" else KEYS[who]}


def _wait_job(c, job_id: str, who: str) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < 120:
        job = c.get(f"/v1/jobs/{job_id}", headers=h(who)).json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            return job
        time.sleep(0.1)
    raise TimeoutError(job_id)


@pytest.fixture(scope="module")
def app(tiny_world, tmp_path_factory):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    d = tmp_path_factory.mktemp("tenants")
    keys = d / "keys.json"
    keys.write_text(json.dumps([{"name": n, "key": k, "admin": n == "ops"} for n, k in KEYS.items()]))
    s = Settings(
        data_dir=d / "data", default_steps=STEPS, queue_size=4, threads=1, api_key=SHARED, api_keys_file=keys,
        **tiny_world,
    )  # fmt: skip
    with TestClient(create_app(s)) as c:
        wait_ready(c)
        yield c


def _identity(c, who: str, name: str = "p", key: str | None = None, photos=OBAMA[:2]):
    headers = {**h(who), **({"Idempotency-Key": key} if key else {})}
    return c.post("/v1/identities", files=photo_files(photos), data={"name": name}, headers=headers)


@pytest.fixture(scope="module")
def alices(app) -> dict:
    """Alice's identity and a finished job with one result image."""
    r = _identity(app, "alice", "alice")
    assert r.status_code == 201, r.text
    idt = r.json()["id"]
    r = app.post("/v1/jobs", json={"identity_ids": [idt], "prompts": ["a photo"]}, headers=h("alice"))
    assert r.status_code == 202, r.text
    assert _wait_job(app, r.json()["id"], "alice")["status"] == "succeeded"
    job = r.json()["id"]
    r = app.post("/v1/finetunes", files=photo_files(OBAMA[:2]), data={"steps": "1"}, headers=h("alice"))
    assert r.status_code == 202, r.text
    ftj, t0 = r.json()["id"], time.monotonic()
    while (ft := app.get(f"/v1/finetunes/{ftj}", headers=h("alice")).json())["status"] in ("queued", "running"):
        assert time.monotonic() - t0 < 120, ft
        time.sleep(0.1)
    assert ft["status"] == "succeeded", ft  # the identity it made is alice's too
    return {"idt": idt, "job": job, "ftj": ftj, "ft_idt": ft["identity_id"]}


# (method, path, JSON body) with {idt} / {job} for the owner's ids
ROUTES = [
    ("GET", "/v1/identities/{idt}", None),
    ("GET", "/v1/identities/{idt}/faces/0.png", None),
    ("GET", "/v1/identities/{idt}/adapter", None),
    ("DELETE", "/v1/identities/{idt}", None),
    ("POST", "/v1/generations", {"identity_id": "{idt}", "prompt": "a photo", "seed": 1}),
    ("POST", "/v1/jobs", {"identity_ids": ["{idt}"], "prompts": ["a photo"]}),
    ("GET", "/v1/jobs/{job}", None),
    ("GET", "/v1/jobs/{job}/results", None),
    ("GET", "/v1/jobs/{job}/events", None),
    ("GET", "/v1/jobs/{job}/results/0/0.png", None),
    ("DELETE", "/v1/jobs/{job}", None),
    ("GET", "/v1/finetunes/{ftj}", None),
    ("DELETE", "/v1/finetunes/{ftj}", None),
]


def _call(c, method: str, path: str, body, who: str, ids: dict):
    fill = lambda x: x.replace("{idt}", ids["idt"]).replace("{job}", ids["job"]).replace("{ftj}", ids["ftj"])  # noqa: E731
    body = json.loads(fill(json.dumps(body))) if body is not None else None
    return c.request(method, fill(path), json=body, headers=h(who))


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
@pytest.mark.parametrize("who", ["bob", "default"])
def test_another_tenants_ids_are_not_found(app, alices, method, path, body, who):
    """Bob (and the shared key's tenant) get for alice's ids exactly what they get for ids that do not exist."""
    foreign = _call(app, method, path, body, who, alices)
    missing = _call(app, method, path, body, who, MISSING)
    assert foreign.status_code == missing.status_code == 404, foreign.text

    def hide(r, ids: dict) -> str:  # the ids and the per-request X-Request-ID aside, the bodies are the same
        text = re.sub(r'"request_id":\s*"[^"]*"', "", r.text)
        return text.replace(ids["idt"], "ID").replace(ids["job"], "ID").replace(ids["ftj"], "ID")

    assert hide(foreign, alices) == hide(missing, MISSING)
    # alice's data is untouched, and the route works for her (and for the admin)
    assert app.get(f"/v1/identities/{alices['idt']}", headers=h("alice")).status_code == 200
    job = app.get(f"/v1/jobs/{alices['job']}", headers=h("alice")).json()
    assert job["status"] == "succeeded" and job["tenant"] == "alice"
    if method == "GET":
        for owner in ("alice", "ops"):
            assert _call(app, method, path, body, owner, alices).status_code == 200, (owner, path)


def test_lists_page_per_tenant_and_the_admin_sees_all(app, alices):
    bobs = [_identity(app, "bob", f"b{i}").json()["id"] for i in range(3)]
    mine = app.get("/v1/identities", headers=h("bob")).json()
    assert [i["id"] for i in mine["items"]] == bobs and mine["next_cursor"] is None
    seen, cursor = [], None
    while True:
        page = app.get("/v1/identities", params={"limit": 1, **({"cursor": cursor} if cursor else {})},
                       headers=h("bob")).json()  # fmt: skip
        assert len(page["items"]) <= 1
        seen += [i["id"] for i in page["items"]]
        if (cursor := page["next_cursor"]) is None:
            break
    assert seen == bobs
    everyone = app.get("/v1/identities", params={"limit": 100}, headers=h("ops")).json()["items"]
    assert {alices["idt"], *bobs} <= {i["id"] for i in everyone}
    assert {i["tenant"] for i in everyone} >= {"alice", "bob"}
    mine = [i["id"] for i in app.get("/v1/identities", headers=h("alice")).json()["items"]]
    assert mine == [alices["idt"], alices["ft_idt"]]  # hers, and the one her fine-tune made
    assert app.get("/v1/jobs", headers=h("bob")).json() == {"items": [], "next_cursor": None}
    jobs = app.get("/v1/jobs", headers=h("alice")).json()["items"]
    assert [j["id"] for j in jobs] == [alices["job"]]
    assert alices["job"] in [j["id"] for j in app.get("/v1/jobs", headers=h("ops")).json()["items"]]
    results = app.get(f"/v1/jobs/{alices['job']}/results", params={"limit": 1}, headers=h("alice")).json()
    assert len(results["results"]) == 1 and results["next_cursor"] is None


@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        ("/v1/identities", {"limit": 0}, "limit"),
        ("/v1/identities", {"limit": 101}, "limit"),
        ("/v1/jobs", {"limit": "x"}, "limit"),
        ("/v1/jobs", {"cursor": "a" * 401}, "cursor"),
        ("/v1/jobs", {"cursor": "bad cursor!"}, "cursor"),
        ("/v1/identities", {"cursor": "WyJqb2IiLCAxLjAsICJ4Il0"}, "cursor"),  # a jobs-list cursor
        ("/v1/jobs/{job}/results", {"cursor": "WyJpZHQiLCAxLjAsICJ4Il0"}, "cursor"),  # an identities cursor
        ("/v1/jobs/{job}/results", {"limit": 1000}, "limit"),
    ],
)
def test_list_parameters_are_bounded(app, alices, path, params, field):
    r = app.get(path.replace("{job}", alices["job"]), params=params, headers=h("alice"))
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert field in err["message"] and any(field in d["field"] for d in err["details"])


def test_identity_idempotency_key(app):
    first = _identity(app, "alice", "idem", key="upload-1")
    assert first.status_code == 201, first.text
    again = _identity(app, "alice", "idem", key="upload-1")
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == f"/v1/identities/{first.json()['id']}"
    names = [i["name"] for i in app.get("/v1/identities", params={"limit": 100}, headers=h("alice")).json()["items"]]
    assert names.count("idem") == 1
    other = _identity(app, "alice", "another name", key="upload-1")
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_mismatch"
    fewer = _identity(app, "alice", "idem", key="upload-1", photos=OBAMA[:1])
    assert fewer.status_code == 409
    bobs = _identity(app, "bob", "idem", key="upload-1")  # keys are per tenant
    assert bobs.status_code == 201 and bobs.json()["id"] != first.json()["id"] and bobs.json()["tenant"] == "bob"
    long = _identity(app, "alice", "idem", key="k" * 201)
    assert long.status_code == 422 and "idempotency-key" in long.json()["error"]["message"].lower()


def test_delete_leaves_nothing_of_the_identity(app):
    """After DELETE: no file under the data directory is named after the identity or holds its photos, face crops,
    adapter, embeddings or job images, and no copy of its adapter is left in memory."""
    state = app.app.state.svc
    idt = _identity(app, "alice", "to delete", photos=OBAMA[5:7]).json()["id"]  # photos no other test here uses
    folder = state.storage.identity_dir(idt)
    secrets_ = [p.read_bytes() for p in folder.iterdir()]  # photo-*.jpg, face-*.png, adapter.safetensors
    secrets_.append(state.storage.get_identity(idt).embeddings)
    job = {"identity_ids": [idt], "prompts": ["a portrait of the deleted one"], "num_images": 2, "seed": 99}
    r = app.post("/v1/jobs", json=job, headers=h("alice"))
    assert _wait_job(app, r.json()["id"], "alice")["status"] == "succeeded"
    images = list((state.storage.root / "results" / r.json()["id"]).iterdir())
    assert len(images) == 2
    secrets_ += [p.read_bytes() for p in images]
    assert app.post("/v1/generations", json={"identity_id": idt, "prompt": "x"}, headers=h("alice")).status_code == 200
    assert idt in state.engine.cached()
    assert app.get(f"/v1/identities/{idt}", headers=h("alice")).json()["last_used"] is not None

    assert app.delete(f"/v1/identities/{idt}", headers=h("alice")).status_code == 204
    assert idt not in state.engine.cached()
    leftovers = []
    for p in state.storage.root.rglob("*"):
        if idt in str(p):
            leftovers.append(str(p))
        elif p.is_file():
            data = p.read_bytes()
            leftovers += [f"{p} holds {len(s)} bytes of it" for s in secrets_ if s in data]
    assert not leftovers
    res = app.get(f"/v1/jobs/{r.json()['id']}/results", headers=h("alice")).json()["results"]
    assert [it["images"] for it in res] == [[]] and "deleted" in res[0]["error"]
    assert app.get(f"/v1/identities/{idt}", headers=h("alice")).status_code == 404


def test_retention_deletes_identities_nobody_used(tiny_world, tmp_path):
    """With a 1 s retention, the service deletes an identity nobody used, and keeps one that is being used."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    s = Settings(data_dir=tmp_path, default_steps=2, threads=1, identity_retention_s=1, warmup=False, **tiny_world)
    with TestClient(create_app(s)) as c:
        wait_ready(c)
        idle, used = (_identity(c, "default", n, photos=OBAMA[:1]).json()["id"] for n in ("idle", "used"))
        t0 = time.monotonic()
        while time.monotonic() - t0 < 20 and c.get(f"/v1/identities/{idle}").status_code == 200:
            assert c.post("/v1/generations", json={"identity_id": used, "prompt": "x"}).status_code == 200
        assert c.get(f"/v1/identities/{idle}").status_code == 404
        assert not (tmp_path / "identities" / idle).exists() and idle not in c.app.state.svc.engine.cached()
        assert c.get(f"/v1/identities/{used}").status_code == 200
        time.sleep(2.0)  # unused now: it goes too
        assert c.get(f"/v1/identities/{used}").status_code == 404
