"""A bounded burst against the loaded app (queue bound 4): 40 concurrent generation requests, in-process over ASGI.

Every admitted request gets 200 with its image, the rest 429 + ``Retry-After``, nothing else, nothing hangs, and
``/readyz`` polled during the burst stays 200; then the rejected ones honour ``Retry-After`` and are all served.
``bench/reliability.py --load 200 --queue-size 16`` is the same over real HTTP against a real server.
"""

from __future__ import annotations

import asyncio

import httpx

from tests.reliability.conftest import AUTH
from tests.reliability.corpus import face_jpeg
from tests.reliability.loadgen import burst
from tests.utils.faces import needs_faces

N = 40  # concurrent requests (the app's queue bound is 4)


@needs_faces
def test_burst_is_admitted_or_refused_never_lost(rel_app):
    client, _ = rel_app
    r = client.post("/v1/identities", files=[("photos", ("a.jpg", face_jpeg(), "image/jpeg"))], headers=AUTH)
    assert r.status_code == 201, r.text
    ident = r.json()["id"]
    queue = client.app.state.svc.settings.queue_size
    assert queue < N // 4

    async def run() -> dict:
        transport = httpx.ASGITransport(app=client.app)  # the lifespan already runs under ``client``
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", headers=AUTH) as ac:
            return await burst(ac, N, identity_id=ident, steps=2, size=32, timeout=60, retry=True, retry_deadline=60)

    out = asyncio.run(run())
    assert out["hangs"] == 0 and out["other"] == 0 and out["server_errors_5xx"] == 0, out
    assert out["admitted"] + out["rejected_429"] == N, out
    assert out["admitted"] >= 1 and out["rejected_429"] >= N // 2, out  # the bound really bit
    assert out["lost_results"] == 0, out
    assert out["readyz"]["polls"] >= 1 and out["readyz"]["failures"] == 0, out
    assert out["retry_after_s"]["min"] >= 1, out
    retry = out["retry"]
    assert retry["eventually_served"] == out["rejected_429"] and retry["lost_results"] == 0, retry
    assert client.app.state.svc.engine.queue_depth == 0
    assert client.get("/readyz").status_code == 200
