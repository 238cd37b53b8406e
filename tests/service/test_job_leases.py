"""The job runner of a real, loaded app (tiny world) on both backends, next to other replicas' ``Storage``s on the
same database and data directory: start-up leaves a live replica's job alone, an expired lease is taken over and
the job finished with every result exactly once, a graceful stop gives the job back to the queue."""

from __future__ import annotations

import secrets
import time

import pytest

from service.jobs import job_items, request_hash
from service.schemas import JobRequest
from service.storage import Storage, new_id
from tests.service.conftest import OBAMA, STEPS, photo_files, wait_ready
from tests.service.test_e2e import _wait_job

LEASE_S = 1.0


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def app(request, tiny_world, tmp_path_factory):
    """``(TestClient, data_dir, database_url)`` of a loaded app with 1 s job leases."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    url = None
    if request.param == "postgresql":
        from tests.utils.postgres import fresh_database

        url = fresh_database(request.getfixturevalue("postgres_server").url, f"jobs_{secrets.token_hex(4)}")
    data = tmp_path_factory.mktemp(f"jobs-{request.param}")
    s = Settings(data_dir=data, database_url=url, job_lease_s=LEASE_S, default_steps=STEPS, threads=1, **tiny_world)
    with TestClient(create_app(s)) as c:
        wait_ready(c)
        yield c, data, url


@pytest.fixture(scope="module")
def ident(app) -> str:
    client, _, _ = app
    r = client.post("/v1/identities", files=photo_files(OBAMA[:2]))
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _queue(other: Storage, ident: str, n: int) -> str:
    req = JobRequest(identity_ids=[ident], prompts=[f"p{i}" for i in range(n)], settings={"steps": STEPS})
    jid, _ = other.create_job(new_id("job"), req.model_dump(mode="json"), request_hash(req), job_items(req), None)
    return jid


def test_a_live_replicas_job_is_left_alone_then_taken_over_when_its_lease_expires(app, ident):
    client, data, url = app
    other = Storage(data, url, lease_s=LEASE_S)  # another replica: it claims the job and finishes item 0
    try:
        jid = _queue(other, ident, 3)
        assert other.claim_job() == jid
        assert other.complete_item(jid, 0, [b"\x89PNG other"], [0], 0.1)
        for _ in range(4):  # while it renews its lease, the app never touches the job
            time.sleep(LEASE_S / 3)
            assert other.heartbeat() == {jid}
            job = other.get_job(jid)
            assert job["lease_owner"] == other.owner and job["done"] == 1
        # the other replica stops renewing (hangs or dies): after the lease the app takes over and finishes
        job = _wait_job(client, jid, lambda j: j["status"] == "succeeded", timeout=60)
        assert job["done"] == 3 and job["failed"] == 0
        final = other.get_job(jid)
        assert final["attempts"] == 2 and final["lease_owner"] is None
        assert other.heartbeat() == set() and other.finish_job(jid, "failed") is False  # no longer its job
        rows, _ = other.job_results(jid)
        assert [(r["idx"], r["k"]) for r in rows] == [(0, 0), (1, 0), (2, 0)]  # every result exactly once
        assert (data / rows[0]["file"]).read_bytes() == b"\x89PNG other"  # item 0 was not redone
        for r in rows[1:]:
            assert client.get(f"/v1/jobs/{jid}/results/{r['idx']}/0.png").content[:4] == b"\x89PNG"
    finally:
        other.close()


def test_readyz_names_the_replica_and_the_database(app):
    client, _, url = app
    d = client.get("/readyz").json()["details"]
    assert d["database"] == ("postgresql" if url else "sqlite")
    assert (
        d["replica"] == client.app.state.svc.storage.owner
        and d["replica"] in client.app.state.svc.storage.live_replicas()
    )


def test_jobs_queued_by_another_replica_are_run(app, ident):
    client, data, url = app
    other = Storage(data, url, lease_s=LEASE_S)
    try:
        jid = _queue(other, ident, 2)  # no notify reaches the app: its runner finds the job by polling
        job = _wait_job(client, jid, lambda j: j["status"] == "succeeded", timeout=60)
        assert job["done"] == 2 and other.get_job(jid)["attempts"] == 1
    finally:
        other.close()
