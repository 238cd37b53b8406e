"""Property-based API fuzzing over HTTP: ``difflora serve`` (uvicorn, loopback, tiny preset, an API key) in a
subprocess; schemathesis generates valid and invalid requests for every operation of the server's own
``/openapi.json`` (``tests/reliability/fuzzing.py``), each response checked for 5xx, undeclared status code or
content type, and a body that violates the schema. One identity and one finished job are created first; half the
cases of each non-DELETE operation with such a path parameter use them, so 200 answers are checked too.

Usage: ``python bench/fuzz.py [--examples 100] [--seed 0] [--out bench/results/fuzz.json]``
Writes ``bench/results/fuzz.json`` and prints a table. Exit status 1 on any server error or schema violation.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._server import stop_server, tiny_world  # noqa: E402
from bench.reliability import KEY, _mem_mb, _start  # noqa: E402
from pipeline_data.photos import faces_dir  # noqa: E402
from weights.atomic import atomic_write_json  # noqa: E402

PHOTOS = faces_dir() / "photos"  # an identity from obama*.jpg, so fuzzed paths also hit real ids


def _wait_ready(proc: subprocess.Popen, session, url: str, log_path: Path, timeout: float = 300.0) -> None:
    import requests

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError("server exited during start-up:\n" + log_path.read_text()[-2000:])
        try:
            if session.get(url + "/readyz", timeout=10).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"server not ready after {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=100, help="generated cases per operation (every operation)")
    ap.add_argument("--seed", type=int, default=0, help="hypothesis seed (reproducible cases)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "fuzz.json"))
    args = ap.parse_args(argv)
    if args.examples < 1:
        print("--examples must be >= 1", file=sys.stderr)
        return 2

    import requests
    import schemathesis

    from tests.reliability.fuzzing import fuzz_all, load_schema, seed_resources

    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        world = tiny_world(tmp)
        log = open(tmp / "server.log", "wb")  # noqa: SIM115
        proc, url = _start(tmp, world, log, 16)  # the default queue_size
        session = requests.Session()
        session.headers["X-API-Key"] = KEY
        try:
            try:
                _wait_ready(proc, session, url, tmp / "server.log")
            except (RuntimeError, TimeoutError) as exc:
                print(str(exc), file=sys.stderr)
                return 1
            mem_before = _mem_mb(proc.pid)
            schema = load_schema(session.get(url + "/openapi.json", timeout=30).json())
            photos = sorted(PHOTOS.glob("obama*.jpg"))[:2]
            known = seed_resources(session, url, photos) if photos else None
            report = fuzz_all(schema, session, url, args.examples, args.seed, known=known)
            ready_after = session.get(url + "/readyz", timeout=30).status_code == 200
            mem_after = _mem_mb(proc.pid)
        finally:
            session.close()
            stop_server(proc, log)

    result = {
        "tool": f"schemathesis {schemathesis.__version__ if hasattr(schemathesis, '__version__') else ''}".strip(),
        "transport": "HTTP to uvicorn on loopback (tiny preset, API key on every case)",
        "examples_per_operation": args.examples, "seed": args.seed, "modes": ["positive", "negative"],
        "checks": ["not_a_server_error", "status_code_conformance", "content_type_conformance",
                   "response_schema_conformance"],
        **{k: report[k] for k in ("cases", "server_errors", "violations", "seconds")},
        "seeded": known, "ready_after": ready_after,
        "rss_mb_before": mem_before.get("VmRSS"), "rss_mb_after": mem_after.get("VmRSS"),
        "operations": report["operations"], "platform": platform.platform(), "cpus": os.cpu_count(),
    }  # fmt: skip
    atomic_write_json(args.out, result, indent=2)

    print(f"{'operation':52s} {'cases':>5s} {'5xx':>4s} {'viol':>4s}  statuses")
    for label, o in report["operations"].items():
        st = " ".join(f"{k}:{v}" for k, v in o["statuses"].items())
        print(f"{label:52s} {o['cases']:5d} {o['server_errors']:4d} {o['violations']:4d}  {st}")
        for f in o["failures"]:
            print(f"    {f}")
    print(
        f"{result['cases']} cases in {result['seconds']} s: {result['server_errors']} server errors, "
        f"{result['violations']} schema violations; ready after: {ready_after}; "
        f"RSS {result['rss_mb_before']} -> {result['rss_mb_after']} MiB -> {args.out}"
    )
    return 1 if result["server_errors"] or result["violations"] or not ready_after else 0


if __name__ == "__main__":
    sys.exit(main())
