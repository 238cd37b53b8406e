"""kill -9 the real server while a batch job runs and while an identity is being created; restart; nothing is lost,
duplicated or left half-written."""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import OBAMA, photo_files
from tests.service.test_e2e import Server, _wait_job
from tests.utils.faces import needs_faces

pytestmark = needs_faces  # every test creates identities from the photos


def _kill9(srv: Server) -> None:
    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait(30)
    srv.http.close()
    srv.log.close()


def _db_ok(data: Path) -> sqlite3.Connection:
    db = sqlite3.connect(data / "difflora.sqlite3")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    return db


def _no_partial_files(data: Path) -> None:
    assert not list(data.glob("**/.*.tmp")) and not list(data.glob("**/*.tmp"))


@pytest.fixture()
def server(tiny_world, tmp_path):
    box = {"data": tmp_path, "world": tiny_world, "log": tmp_path / "server.log"}
    box["server"] = Server(tmp_path, tiny_world, box["log"])
    box["server"].wait_ready()
    yield box
    srv = box["server"]
    if srv.proc.poll() is None:
        srv.stop()


def test_kill9_during_batch_job_finishes_every_result_once(server) -> None:
    srv: Server = server["server"]
    ident = srv.http.post("/v1/identities", files=photo_files(OBAMA[:3])).json()["id"]
    n = 6
    req = {
        "identity_ids": [ident],
        "prompts": [f"photo {i} of sks person" for i in range(n)],
        "settings": {"steps": 10},
    }
    jid = srv.http.post("/v1/jobs", json=req, headers={"Idempotency-Key": "crash-job"}).json()["id"]
    _wait_job(srv.http, jid, lambda j: j["done"] >= 1)
    _kill9(srv)
    db = _db_ok(server["data"])
    done_at_kill = db.execute("SELECT COUNT(*) FROM job_items WHERE job_id=? AND status='done'", (jid,)).fetchone()[0]
    db.close()
    assert done_at_kill < n, "the job finished before the kill: nothing was tested"
    srv = server["server"] = Server(server["data"], server["world"], server["log"])
    srv.wait_ready()
    again = srv.http.post("/v1/jobs", json=req, headers={"Idempotency-Key": "crash-job"})
    assert again.status_code == 200 and again.json()["id"] == jid
    job = _wait_job(srv.http, jid, lambda j: j["status"] in ("succeeded", "failed"))
    assert job["status"] == "succeeded" and job["done"] == n
    db = _db_ok(server["data"])
    rows = db.execute("SELECT idx, COUNT(*) FROM results WHERE job_id=? GROUP BY idx", (jid,)).fetchall()
    db.close()
    assert sorted(rows) == [(i, 1) for i in range(n)]  # every result exactly once
    pngs = sorted((server["data"] / "results" / jid).iterdir())
    assert len(pngs) == n and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    _no_partial_files(server["data"])


@pytest.mark.parametrize("delay", [0.05, 0.3])
def test_kill9_during_identity_creation_leaves_all_or_nothing(server, delay: float) -> None:
    srv: Server = server["server"]
    out: dict = {}

    def post() -> None:
        try:
            out["r"] = srv.http.post("/v1/identities", files=photo_files(OBAMA[:4]))
        except httpx.TransportError as e:
            out["err"] = e

    t = threading.Thread(target=post)
    t.start()
    time.sleep(delay)
    _kill9(srv)
    t.join(30)
    srv = server["server"] = Server(server["data"], server["world"], server["log"])
    srv.wait_ready()
    db = _db_ok(server["data"])
    ids = [r[0] for r in db.execute("SELECT id FROM identities").fetchall()]
    db.close()
    for iid in ids:  # whatever was committed is complete and usable
        assert srv.http.get(f"/v1/identities/{iid}").status_code == 200
        d = srv.http.get(f"/v1/identities/{iid}/adapter", params={"format": "native"})
        assert d.status_code == 200 and len(d.content) > 1000
    if "r" in out and out["r"].status_code == 201:
        assert out["r"].json()["id"] in ids
    # no orphaned identity folders: every folder on disk belongs to a committed identity
    folders = (
        [p.name for p in (server["data"] / "identities").iterdir()] if (server["data"] / "identities").exists() else []
    )
    assert set(folders) <= set(ids), (folders, ids)
    _no_partial_files(server["data"])
    assert srv.http.post("/v1/identities", files=photo_files(OBAMA[:2])).status_code == 201  # still works
