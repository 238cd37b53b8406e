"""Reliability against a real server and in-process: hostile uploads, a bounded load burst, an identity-switch soak.

* Corpus (``--rounds``, default 1): ``difflora serve`` (uvicorn, loopback, tiny preset, an API key) in a
  subprocess; every case of ``tests/reliability/corpus.py`` posted over HTTP ``--rounds`` times. Per case the
  status and error code (expected vs got), the 5xx count, whether ``/readyz`` stayed 200 after every request, and
  the server's resident memory (VmRSS before / after, VmHWM peak) from ``/proc``.
* Load (``--load N``, default 200; 0 skips): on the same server (queue bound ``--queue-size``, default 16), N
  concurrent ``POST /v1/generations`` on loopback, each with a timeout, while ``/readyz`` is polled; admitted
  requests must all be 200 with their image, the rest 429 + ``Retry-After``, nothing else, no hang; p50/p99 of the
  admitted ones. The rejected then honour ``Retry-After`` until served (nothing lost). See
  ``tests/reliability/loadgen.py``.
* Soak (``--soak``): in this process on the real tiny pipeline, ``--switches`` identity switches (apply / restore,
  adapters re-read from safetensors every cycle) with ``--generations`` generations spread over them; RSS growth after
  warm-up, exact restore, fixed-seed outputs unchanged. See ``tests/reliability/soak.py``.

Usage: ``python bench/reliability.py [--rounds 1] [--load 200] [--queue-size 16] [--soak] [--out ...]``
Writes ``bench/results/reliability.json`` (``--rounds 0`` keeps the corpus figures already in it) and prints a
table. Exit status 1 when anything misbehaved.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._server import free_port, stop_server, tiny_world  # noqa: E402
from weights.atomic import atomic_write_json  # noqa: E402

KEY = "bench-reliability-key"
RSS_BOUND_MB = 400  # allowed peak-RSS rise over the ready server: a decoded 14000^2 bomb alone would be ~560 MiB
SOAK_GROWTH_PCT = 2.0  # allowed RSS growth over the soak, after warm-up


def _mem_mb(pid: int) -> dict:
    """VmRSS and VmHWM (peak RSS) of ``pid`` in MiB, from /proc."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = round(int(val.split()[0]) / 1024, 1)
    return out


def _start(tmp: Path, world: dict, log, queue_size: int) -> tuple[subprocess.Popen, str]:
    from tests.reliability.corpus import MAX_BODY, MAX_PHOTOS

    port = free_port()
    env = {
        **os.environ, "PYTHONPATH": str(REPO), "DIFFLORA_THREADS": "1", "DIFFLORA_DEFAULT_STEPS": "3",
        "DIFFLORA_MODEL_PATH": world["model_path"], "DIFFLORA_UNTRAINED_HYPERNET": str(world["untrained_hypernet"]),
        "DIFFLORA_API_KEY": KEY, "DIFFLORA_MAX_BODY_BYTES": str(MAX_BODY), "DIFFLORA_MAX_PHOTOS": str(MAX_PHOTOS),
        "DIFFLORA_QUEUE_SIZE": str(queue_size),
    }  # fmt: skip
    cmd = [sys.executable, "-m", "service.cli", "serve", "--preset", "tiny", "--data-dir", str(tmp / "data"),
           "--port", str(port), "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def _wait_ready(http, proc: subprocess.Popen, log_path: Path, timeout: float = 600) -> None:
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError("server exited during start-up:\n" + log_path.read_text()[-2000:])
        try:
            if http.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"server not ready after {timeout:.0f} s")


def run_corpus(http, pid: int, rounds: int) -> dict:
    """Post the whole corpus ``rounds`` times; figures and one row per case (first round)."""
    from tests.reliability.corpus import CASES

    auth = {"X-API-Key": KEY}
    mem_before = _mem_mb(pid)
    rows, n5xx, not_ready, wrong = [], 0, 0, 0
    growth: dict[str, float] = {c.name: 0.0 for c in CASES}  # RSS MiB added by each case, summed
    t_run = time.perf_counter()
    for rnd in range(rounds):
        for case in CASES:
            kw = case.build()
            kw["headers"] = {**auth, **kw.get("headers", {})}
            rss0 = _mem_mb(pid)["VmRSS"]
            t = time.perf_counter()
            r = http.post("/v1/identities", **kw)
            dt = time.perf_counter() - t
            try:
                err = r.json().get("error") or {}
            except ValueError:
                err = {"code": "<not json>"}
            details = err.get("details") or [{}]
            got_photo = details[0].get("code") if isinstance(details[0], dict) else None
            ok = r.status_code == case.status and err.get("code") == case.code
            ok = ok and (case.photo_code is None or got_photo == case.photo_code)
            ready = http.get("/readyz").status_code == 200
            growth[case.name] += _mem_mb(pid)["VmRSS"] - rss0
            n5xx += r.status_code >= 500
            not_ready += not ready
            wrong += not ok
            if rnd == 0:
                rows.append({
                    "case": case.name, "expected": [case.status, case.code, case.photo_code],
                    "got": [r.status_code, err.get("code"), got_photo], "ok": ok, "ready_after": ready,
                    "seconds": round(dt, 3),
                })  # fmt: skip
    run_s = time.perf_counter() - t_run
    mem_after = _mem_mb(pid)
    return {
        "cases": len(CASES), "rounds": rounds, "requests": len(CASES) * rounds, "server_errors_5xx": n5xx,
        "unexpected_answers": wrong, "readyz_failures": not_ready, "seconds": round(run_s, 1),
        "rss_mb_before": mem_before.get("VmRSS"), "rss_mb_after": mem_after.get("VmRSS"),
        "rss_mb_peak": mem_after.get("VmHWM"),
        "rss_bound_mb": RSS_BOUND_MB,
        "rss_bounded": mem_after["VmHWM"] - mem_before["VmRSS"] < RSS_BOUND_MB,
        "rss_growth_pct": round(100 * (mem_after["VmRSS"] / mem_before["VmRSS"] - 1), 2),
        "rss_mb_growth_by_case": {k: round(v, 1) for k, v in sorted(growth.items(), key=lambda kv: -kv[1])[:10]},
        "per_case": rows,
    }  # fmt: skip


def run_load(http, url: str, pid: int, n: int, queue_size: int, timeout: float) -> dict:
    """One identity, then ``n`` concurrent generations for it (see tests/reliability/loadgen.py)."""
    import asyncio

    import httpx

    from tests.reliability.corpus import face_jpeg
    from tests.reliability.loadgen import burst

    r = http.post("/v1/identities", files=[("photos", ("a.jpg", face_jpeg(), "image/jpeg"))])
    if r.status_code != 201:
        raise RuntimeError(f"identity for the load test not created: {r.status_code} {r.text[:300]}")
    ident = r.json()["id"]
    mem_before = _mem_mb(pid)

    async def go() -> dict:
        limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
        async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": KEY}, limits=limits, timeout=None) as ac:
            return await burst(ac, n, identity_id=ident, steps=3, size=64, timeout=timeout, retry=True,
                               retry_deadline=max(600.0, timeout))  # fmt: skip

    out = asyncio.run(go())
    mem_after = _mem_mb(pid)
    retry = out.get("retry", {})
    out.update(
        queue_size=queue_size, steps=3, size=64, timeout_s=timeout,
        rss_mb_before=mem_before["VmRSS"], rss_mb_after=mem_after["VmRSS"],
        ok=out["hangs"] == 0 and out["other"] == 0 and out["lost_results"] == 0 and out["readyz"]["failures"] == 0
        and out["admitted"] + out["rejected_429"] == n and retry.get("eventually_served", 0) == out["rejected_429"]
        and retry.get("lost_results", 0) == 0,
    )  # fmt: skip
    return out


def run_soak_bench(world: dict, tmp: Path, switches: int, generations: int, size: int) -> dict:
    """The identity-switch soak in this process (see tests/reliability/soak.py)."""
    import torch

    from pipeline_data.models import load_pipeline
    from tests.reliability.soak import run_soak, write_adapters

    torch.set_num_threads(1)
    pipe = load_pipeline(world["model_path"])
    files = write_adapters(pipe.unet, tmp / "soak-adapters", k=4)

    def progress(i: int, made: int) -> None:
        print(f"  soak: {i}/{switches} switches, {made} generations", file=sys.stderr, flush=True)

    out = run_soak(pipe, files, switches=switches, generations=generations, steps=2, size=size, progress=progress)
    out["growth_bound_pct"] = SOAK_GROWTH_PCT
    out["ok"] = (out["exact_restore"] and out["fixed_seed_base_unchanged"] and out["fixed_seed_identity_unchanged"]
                 and out["rss_growth_pct"] < SOAK_GROWTH_PCT)  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1, help="times the whole corpus is posted (0: keep the old figures)")
    ap.add_argument("--load", type=int, default=200, help="concurrent generation requests in the burst (0: skip)")
    ap.add_argument("--queue-size", type=int, default=16, help="the server's model-queue bound")
    ap.add_argument("--load-timeout", type=float, default=300.0, help="seconds before a request counts as hung")
    ap.add_argument("--soak", action="store_true", help="run the identity-switch soak")
    ap.add_argument("--switches", type=int, default=1000, help="soak: identity switches")
    ap.add_argument("--generations", type=int, default=500, help="soak: generations spread over the switches")
    ap.add_argument("--soak-size", type=int, default=64, help="soak: image side (2 denoising steps)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "reliability.json"))
    args = ap.parse_args(argv)
    if args.rounds < 0 or args.load < 0 or args.queue_size < 1 or args.switches < 1 or args.generations < 0:
        print("--rounds/--load must be >= 0, --queue-size/--switches >= 1", file=sys.stderr)
        return 2

    import httpx

    out = Path(args.out)
    result: dict = {}
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        world = tiny_world(tmp)
        if args.rounds or args.load:
            log = open(tmp / "server.log", "wb")  # noqa: SIM115
            proc, url = _start(tmp, world, log, args.queue_size)
            http = httpx.Client(base_url=url, timeout=300, headers={"X-API-Key": KEY})
            try:
                _wait_ready(http, proc, tmp / "server.log")
                if args.rounds:
                    result.update(run_corpus(http, proc.pid, args.rounds))
                if args.load:
                    result["load"] = run_load(http, url, proc.pid, args.load, args.queue_size, args.load_timeout)
            finally:
                http.close()
                stop_server(proc, log)
        if args.soak:
            result["soak"] = run_soak_bench(world, tmp, args.switches, args.generations, args.soak_size)
    result["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                         "load_avg_1m_at_end": round(os.getloadavg()[0], 2)}  # fmt: skip
    if args.rounds == 0 and out.is_file():  # keep what the file holds (read now: a parallel run may have written)
        result = {**json.loads(out.read_text()), **result}
    atomic_write_json(out, result, indent=1)
    _print(result, args.rounds)
    ok = True
    if args.rounds:
        c = result
        ok = c["server_errors_5xx"] == 0 and c["unexpected_answers"] == 0 and c["readyz_failures"] == 0
        ok = ok and c["rss_bounded"]
    if args.load:
        ok = ok and result["load"]["ok"]
    if args.soak:
        ok = ok and result["soak"]["ok"]
    print(f"-> {out}")
    return 0 if ok else 1


def _print(result: dict, rounds: int) -> None:
    if rounds:
        print(f"{'case':32s} {'expected':34s} {'got':34s} ok")
        for row in result["per_case"]:
            exp, got = (" ".join(str(x) for x in row[k] if x is not None) for k in ("expected", "got"))
            print(f"{row['case']:32s} {exp:34s} {got:34s} {'ok' if row['ok'] else 'MISMATCH'}")
        print(
            f"\ncorpus: {result['requests']} requests ({result['cases']} cases x {rounds}): "
            f"{result['server_errors_5xx']} 5xx, {result['unexpected_answers']} unexpected, "
            f"{result['readyz_failures']} readyz failures; RSS {result['rss_mb_before']} -> {result['rss_mb_after']} "
            f"MiB (peak {result['rss_mb_peak']} MiB) in {result['seconds']} s"
        )
    if "load" in result:
        ld = result["load"]
        rt = ld.get("retry", {})
        print(
            f"load: {ld['requests']} concurrent vs queue {ld['queue_size']}: {ld['admitted']} admitted (200), "
            f"{ld['rejected_429']} 429 + Retry-After, {ld['other']} other, {ld['hangs']} hangs, "
            f"{ld['server_errors_5xx']} 5xx, {ld['lost_results']} lost; admitted p50 {ld['admitted_p50_s']} s, "
            f"p99 {ld['admitted_p99_s']} s; readyz {ld['readyz']['polls']} polls, {ld['readyz']['failures']} failed; "
            f"retries: {rt.get('eventually_served')}/{ld['rejected_429']} served in {rt.get('seconds')} s"
        )
    if "soak" in result:
        sk = result["soak"]
        print(
            f"soak: {sk['switches']} switches ({sk['applies']} apply, {sk['restores']} restore), "
            f"{sk['generations']} generations in {sk['seconds']} s; RSS {sk['rss_mb_after_warmup']} -> "
            f"{sk['rss_mb_end']} MiB ({sk['rss_growth_pct']:+.2f}%); exact restore {sk['exact_restore']}; "
            f"fixed-seed base/identity unchanged {sk['fixed_seed_base_unchanged']}/"
            f"{sk['fixed_seed_identity_unchanged']}"
        )


if __name__ == "__main__":
    sys.exit(main())
