"""Two real ``difflora serve`` replicas (tiny preset) on one PostgreSQL database and one data directory: a batch job
runs, the replica holding its lease is killed with -9, and the other takes the job over after the (short) lease and
finishes it: every result exactly once, no lost or duplicated rows or files, and the survivor's ``/readyz`` answers
200 throughout."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from tests.service.conftest import OBAMA, photo_files
from tests.service.test_e2e import Server, _wait_job

LEASE_S = 2  # short, so the takeover comes within seconds
N = 8  # job items (one image each)


@pytest.fixture()
def cluster(tiny_world, tmp_path, postgres_server):
    """``(replicas, database URL, data dir)``: two ready servers sharing one database and one data directory."""
    from tests.utils.postgres import fresh_database

    url = fresh_database(postgres_server.url, "replicas")
    env = {"DIFFLORA_DATABASE_URL": url, "DIFFLORA_JOB_LEASE_S": str(LEASE_S)}
    data = tmp_path / "shared"
    servers = [Server(data, tiny_world, tmp_path / f"replica{i}.log", env) for i in range(2)]
    try:
        for srv in servers:
            srv.wait_ready()
        yield servers, url, data
    finally:
        for srv in servers:
            if srv.proc.poll() is None:
                srv.stop()


def _db(url: str, sql: str, *args) -> list[tuple]:
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute(sql, args).fetchall()


@pytest.mark.slow
def test_kill9_of_the_replica_holding_a_job_the_other_finishes_it_once(cluster) -> None:
    servers, url, data = cluster
    a, b = servers
    ident = a.http.post("/v1/identities", files=photo_files(OBAMA[:2]))
    assert ident.status_code == 201, ident.text
    req = {"identity_ids": [ident.json()["id"]], "prompts": [f"photo {i} of sks person" for i in range(N)],
           "settings": {"steps": 12}}  # fmt: skip
    jid = b.http.post("/v1/jobs", json=req, headers={"Idempotency-Key": "replicas-job"}).json()["id"]
    _wait_job(a.http, jid, lambda j: j["done"] >= 1, timeout=60)
    ((owner, done_at_kill),) = _db(
        url, "SELECT lease_owner, (SELECT COUNT(*) FROM job_items WHERE job_id=%s AND status='done') "
        "FROM jobs WHERE id=%s", jid, jid,
    )  # fmt: skip
    holder = next(s for s in servers if owner and f"-{s.proc.pid}-" in owner)
    survivor = b if holder is a else a

    probes: list[int | str] = []
    stop = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=survivor.url, timeout=5) as http:
            while not stop.is_set():
                try:
                    probes.append(http.get("/readyz").status_code)
                except httpx.HTTPError as e:
                    probes.append(type(e).__name__)
                time.sleep(0.1)

    t = threading.Thread(target=probe)
    t.start()
    try:
        holder.proc.send_signal(signal.SIGKILL)
        holder.proc.wait(30)
        t_kill = time.monotonic()
        assert done_at_kill < N, "the job finished before the kill: nothing was tested"
        took_over = None
        while time.monotonic() - t_kill < LEASE_S + 30:
            ((now_owner, status),) = _db(url, "SELECT lease_owner, status FROM jobs WHERE id=%s", jid)
            if status != "running" or (now_owner and f"-{survivor.proc.pid}-" in now_owner):
                took_over = time.monotonic() - t_kill
                break
            time.sleep(0.1)
        job = _wait_job(survivor.http, jid, lambda j: j["status"] in ("succeeded", "failed"), timeout=180)
    finally:
        stop.set()
        t.join(10)
    assert job["status"] == "succeeded" and job["done"] == N and job["failed"] == 0, job
    # taken over once the dead replica's lease ran out (its last renewal was at most a lease ago), not before
    assert took_over is not None and took_over < LEASE_S + 30, took_over
    assert probes and set(probes) == {200}, probes  # the survivor stayed ready throughout
    ((attempts, lease_owner, status),) = _db(url, "SELECT attempts, lease_owner, status FROM jobs WHERE id=%s", jid)
    assert status == "succeeded" and attempts == 2 and lease_owner is None  # claimed once, taken over once
    rows = _db(url, "SELECT idx, k, file FROM results WHERE job_id=%s ORDER BY idx, k", jid)
    assert [(i, k) for i, k, _ in rows] == [(i, 0) for i in range(N)]  # every result exactly once
    assert all(f == f"results/{jid}/{i:05d}-0.png" for i, _, f in rows)  # relative: any replica can mount it
    items = _db(url, "SELECT status, COUNT(*) FROM job_items WHERE job_id=%s GROUP BY status", jid)
    assert items == [("done", N)]
    pngs = sorted((data / "results" / jid).iterdir())
    assert [p.name for p in pngs] == [f"{i:05d}-0.png" for i in range(N)]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    for i in range(N):  # every image is served by the survivor from the shared directory
        r = survivor.http.get(f"/v1/jobs/{jid}/results/{i}/0.png")
        assert r.status_code == 200 and r.content == pngs[i].read_bytes()
    assert not list(data.glob("**/.*.tmp"))
    again = survivor.http.post("/v1/jobs", json=req, headers={"Idempotency-Key": "replicas-job"})
    assert again.status_code == 200 and again.json()["id"] == jid
