"""Hostile uploads against a real server: ``difflora serve`` (uvicorn, loopback, tiny preset, an API key) in a
subprocess, every case of ``tests/reliability/corpus.py`` posted over HTTP ``--rounds`` times.

Records per case the status and error code (expected vs got), the 5xx count, whether ``/readyz`` stayed 200 after
every request, and the server's resident memory (VmRSS before / after, VmHWM peak) from ``/proc``.

Usage: ``python bench/reliability.py [--rounds 1] [--out bench/results/reliability.json]``
Writes ``bench/results/reliability.json`` and prints a table. Exit status 1 when any case misbehaved.
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

KEY = "bench-reliability-key"
RSS_BOUND_MB = 400  # allowed peak-RSS rise over the ready server: a decoded 14000^2 bomb alone would be ~560 MiB


def _mem_mb(pid: int) -> dict:
    """VmRSS and VmHWM (peak RSS) of ``pid`` in MiB, from /proc."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = round(int(val.split()[0]) / 1024, 1)
    return out


def _start(tmp: Path, world: dict, log) -> tuple[subprocess.Popen, str]:
    from tests.reliability.corpus import MAX_BODY, MAX_PHOTOS

    port = free_port()
    env = {
        **os.environ, "PYTHONPATH": str(REPO), "DIFFLORA_THREADS": "1", "DIFFLORA_DEFAULT_STEPS": "3",
        "DIFFLORA_MODEL_PATH": world["model_path"], "DIFFLORA_UNTRAINED_HYPERNET": str(world["untrained_hypernet"]),
        "DIFFLORA_API_KEY": KEY, "DIFFLORA_MAX_BODY_BYTES": str(MAX_BODY), "DIFFLORA_MAX_PHOTOS": str(MAX_PHOTOS),
    }  # fmt: skip
    cmd = [sys.executable, "-m", "service.cli", "serve", "--preset", "tiny", "--data-dir", str(tmp / "data"),
           "--port", str(port), "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1, help="times the whole corpus is posted")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "reliability.json"))
    args = ap.parse_args(argv)
    if args.rounds < 1:
        print("--rounds must be >= 1", file=sys.stderr)
        return 2

    import httpx

    from tests.reliability.corpus import CASES

    auth = {"X-API-Key": KEY}
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        world = tiny_world(tmp)
        log = open(tmp / "server.log", "wb")  # noqa: SIM115
        proc, url = _start(tmp, world, log)
        http = httpx.Client(base_url=url, timeout=120)
        try:
            t0 = time.monotonic()
            while True:
                if time.monotonic() - t0 > 300:
                    print("server not ready after 300 s", file=sys.stderr)
                    return 1
                if proc.poll() is not None:
                    print(
                        "server exited during start-up:\n" + (tmp / "server.log").read_text()[-2000:], file=sys.stderr
                    )
                    return 1
                try:
                    if http.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.3)
            mem_before = _mem_mb(proc.pid)
            rows, n5xx, not_ready, wrong = [], 0, 0, 0
            growth: dict[str, float] = {c.name: 0.0 for c in CASES}  # RSS MiB added by each case, summed
            t_run = time.perf_counter()
            for rnd in range(args.rounds):
                for case in CASES:
                    kw = case.build()
                    kw["headers"] = {**auth, **kw.get("headers", {})}
                    rss0 = _mem_mb(proc.pid)["VmRSS"]
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
                    growth[case.name] += _mem_mb(proc.pid)["VmRSS"] - rss0
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
            mem_after = _mem_mb(proc.pid)
        finally:
            http.close()
            stop_server(proc, log)

    tried = len(CASES) * args.rounds
    result = {
        "cases": len(CASES), "rounds": args.rounds, "requests": tried, "server_errors_5xx": n5xx,
        "unexpected_answers": wrong, "readyz_failures": not_ready, "seconds": round(run_s, 1),
        "rss_mb_before": mem_before.get("VmRSS"), "rss_mb_after": mem_after.get("VmRSS"),
        "rss_mb_peak": mem_after.get("VmHWM"),
        "rss_bound_mb": RSS_BOUND_MB,
        "rss_bounded": mem_after["VmHWM"] - mem_before["VmRSS"] < RSS_BOUND_MB,
        "rss_growth_pct": round(100 * (mem_after["VmRSS"] / mem_before["VmRSS"] - 1), 2),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "rss_mb_growth_by_case": {k: round(v, 1) for k, v in sorted(growth.items(), key=lambda kv: -kv[1])[:10]},
        "per_case": rows,
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'case':32s} {'expected':34s} {'got':34s} ok")
    for row in rows:
        exp, got = (" ".join(str(x) for x in row[k] if x is not None) for k in ("expected", "got"))
        print(f"{row['case']:32s} {exp:34s} {got:34s} {'ok' if row['ok'] else 'MISMATCH'}")
    print(
        f"\n{tried} requests ({len(CASES)} cases x {args.rounds}): {n5xx} 5xx, {wrong} unexpected, "
        f"{not_ready} readyz failures; RSS {mem_before.get('VmRSS')} -> {mem_after.get('VmRSS')} MiB "
        f"(peak {mem_after.get('VmHWM')} MiB) in {run_s:.1f} s -> {out}"
    )
    return 0 if n5xx == 0 and wrong == 0 and not_ready == 0 and result["rss_bounded"] else 1


if __name__ == "__main__":
    sys.exit(main())
