"""A bounded burst of concurrent generation requests, shared by ``tests/reliability/test_load.py`` (in-process ASGI)
and ``bench/reliability.py --load`` (a real server on loopback).

:func:`burst` fires ``n`` ``POST /v1/generations`` at once (each with its own timeout) while a poller hits
``/readyz``; every answer is classified: admitted (200, every requested image present with its seed), rejected
(429 with a numeric ``Retry-After``), anything else, or a hang (no answer within the timeout). With ``retry=True`` the
rejected requests then honour ``Retry-After`` (with jitter) until served, to show that nothing is lost.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from typing import Any

import numpy as np


def body(i: int, identity_id: str | None, steps: int, size: int) -> dict:
    """Request ``i`` of a burst: a distinct seed, the same settings (so the worker may batch them)."""
    req: dict[str, Any] = {"prompt": "a photo of sks person", "seed": 1000 + i, "steps": steps, "width": size,
                           "height": size}  # fmt: skip
    if identity_id is not None:
        req["identity_id"] = identity_id
    return req


def _complete(r: Any, req: dict) -> bool:
    """A 200 answer that carries the one image asked for, with the seed asked for."""
    try:
        j = r.json()
    except ValueError:
        return False
    imgs = j.get("images") or []
    return (
        j.get("seed") == req["seed"]
        and len(imgs) == 1
        and imgs[0].get("seed") == req["seed"]
        and bool(imgs[0].get("png_base64"))
    )


def _pct(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)), 3) if xs else None


async def _one(client: Any, req: dict, headers: dict, timeout: float) -> tuple[str, Any, float]:
    t = time.perf_counter()
    try:
        r = await asyncio.wait_for(client.post("/v1/generations", json=req, headers=headers), timeout)
    except TimeoutError:
        return "hang", None, time.perf_counter() - t
    except Exception as e:  # noqa: BLE001 - a transport failure is recorded, not raised
        return f"error:{type(e).__name__}", None, time.perf_counter() - t
    return "ok", r, time.perf_counter() - t


async def _poll_ready(client: Any, stop: asyncio.Event, every: float, out: dict) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        try:
            r = await asyncio.wait_for(client.get("/readyz"), 10)
            ok = r.status_code == 200
            out["not_200"] += not ok
        except TimeoutError:  # no answer within 10 s: a readiness failure too
            ok = False
            out["timeouts"] += 1
        except Exception:  # noqa: BLE001 - a transport error is a readiness failure
            ok = False
            out["errors"] += 1
        out["polls"] += 1
        out["failures"] += not ok
        out["max_seconds"] = max(out["max_seconds"], time.perf_counter() - t)
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            pass


async def burst(
    client: Any,
    n: int,
    *,
    identity_id: str | None = None,
    headers: dict | None = None,
    steps: int = 3,
    size: int = 64,
    timeout: float = 120.0,
    poll_every: float = 0.05,
    retry: bool = False,
    retry_deadline: float = 600.0,
) -> dict:
    """Fire ``n`` concurrent generation requests through ``client`` (an ``httpx.AsyncClient``); see the module
    docstring. Returns counts, admitted latency percentiles and the readiness polls."""
    headers = dict(headers or {})
    reqs = [body(i, identity_id, steps, size) for i in range(n)]
    ready = {"polls": 0, "failures": 0, "not_200": 0, "timeouts": 0, "errors": 0, "max_seconds": 0.0}
    stop = asyncio.Event()
    poller = asyncio.create_task(_poll_ready(client, stop, poll_every, ready))
    t0 = time.perf_counter()
    results = await asyncio.gather(*(_one(client, r, headers, timeout) for r in reqs))
    burst_s = time.perf_counter() - t0
    statuses: Counter = Counter()
    admitted, lat, retry_after, rejected, other = 0, [], [], [], []
    lost = hangs = 0
    for req, (kind, r, dt) in zip(reqs, results):
        if kind != "ok":
            statuses[kind] += 1
            hangs += kind == "hang"
            other.append(kind)
            continue
        statuses[str(r.status_code)] += 1
        if r.status_code == 200:
            admitted += 1
            lat.append(dt)
            lost += not _complete(r, req)
        elif r.status_code == 429:
            ra = r.headers.get("retry-after", "")
            code = (r.json().get("error") or {}).get("code")
            if ra.isdigit() and int(ra) >= 1 and code == "queue_full":
                retry_after.append(int(ra))
                rejected.append(req)
            else:
                other.append(f"429 without a valid Retry-After ({ra!r}, {code!r})")
        else:
            other.append(f"{r.status_code}: {r.text[:200]}")
    out: dict = {
        "requests": n, "admitted": admitted, "rejected_429": len(rejected), "other": len(other),
        "other_examples": other[:5], "hangs": hangs, "server_errors_5xx": sum(
            v for k, v in statuses.items() if k.isdigit() and int(k) >= 500
        ), "lost_results": lost, "statuses": dict(sorted(statuses.items())),
        "admitted_p50_s": _pct(lat, 50), "admitted_p99_s": _pct(lat, 99), "admitted_max_s": _pct(lat, 100),
        "retry_after_s": {"min": min(retry_after, default=None), "max": max(retry_after, default=None)},
        "burst_seconds": round(burst_s, 2),
    }  # fmt: skip
    if retry and rejected:
        out["retry"] = await _retry(client, rejected, headers, timeout, retry_deadline, retry_after)
    stop.set()
    await poller
    out["readyz"] = {**ready, "max_seconds": round(ready["max_seconds"], 3)}
    return out


async def _retry(
    client: Any, pending: list[dict], headers: dict, timeout: float, deadline: float, first_wait: list[int]
) -> dict:
    """Every rejected request waits its Retry-After (x U(1, 2) jitter) and retries until it is served."""
    rng = random.Random(0)
    t0 = time.perf_counter()
    attempts, served, lost, other, transport_errors = 0, 0, 0, [], []

    async def one(req: dict, wait: float) -> None:
        nonlocal attempts, served, lost
        while time.perf_counter() - t0 < deadline:
            await asyncio.sleep(wait * (1 + rng.random()))
            attempts += 1
            kind, r, _ = await _one(client, req, headers, timeout)
            if kind == "ok" and r.status_code == 200:
                served += 1
                lost += not _complete(r, req)
                return
            if kind == "ok" and r.status_code == 429 and r.headers.get("retry-after", "").isdigit():
                wait = float(r.headers["retry-after"])
                continue
            if kind.startswith("error:"):  # e.g. a pooled keep-alive connection the server closed meanwhile
                transport_errors.append(kind)
                wait = 1.0
                continue
            other.append(kind if kind != "ok" else str(r.status_code))
            return

    await asyncio.gather(*(one(req, float(w)) for req, w in zip(pending, first_wait)))
    gave_up = len(pending) - served - len(other)  # still refused when the deadline passed
    return {
        "rejected": len(pending), "eventually_served": served, "attempts": attempts, "lost_results": lost,
        "other": other[:5], "transport_errors_retried": len(transport_errors), "gave_up_at_deadline": gave_up,
        "seconds": round(time.perf_counter() - t0, 2),
    }  # fmt: skip
