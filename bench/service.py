"""Service overhead and batching throughput, measured in one process on one machine.

* ``overhead_ratio``: median latency of ``POST /v1/generations`` (real uvicorn on loopback, HTTP client in this
  process, PNG response) over the median of calling the same pipeline directly with the same adapter merged.
* throughput: N concurrent requests for the same identity (the worker batches them) vs the same N one after another.

Usage: ``python bench/service.py [--steps 20] [--size 64] [--reps 10] [--concurrent 8] [--threads 1]``
Writes ``bench/results/service.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._server import free_port, tiny_world  # noqa: E402
from pipeline_data.photos import faces_dir  # noqa: E402
from weights.atomic import atomic_write_json  # noqa: E402

PHOTOS = faces_dir() / "photos"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--concurrent", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "service.json"))
    args = ap.parse_args(argv)

    import httpx
    import torch
    import uvicorn

    from service.app import create_app
    from service.settings import Settings

    if args.threads:
        torch.set_num_threads(args.threads)  # for the direct calls made from this thread
    tmp = Path(tempfile.mkdtemp(prefix="bench_service_"))
    world = tiny_world(tmp)
    s = Settings(
        data_dir=tmp / "data",
        threads=args.threads,
        device=args.device,
        queue_size=256,
        max_batch_images=max(8, args.concurrent),
        default_steps=args.steps,
        default_size=args.size,
        **world,
    )
    app = create_app(s)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)
    t0 = time.monotonic()
    while True:
        try:
            if http.get("/readyz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() - t0 > 600:
            raise TimeoutError("not ready")
        time.sleep(0.2)
    st = app.state.svc
    photos = sorted(PHOTOS.glob("obama*.jpg"))[:3]
    ident = http.post(
        "/v1/identities", files=[("photos", (p.name, p.read_bytes(), "image/jpeg")) for p in photos]
    ).json()
    iid = ident["id"]
    req = {"identity_id": iid, "prompt": "a photo of sks person", "steps": args.steps, "width": args.size,
           "height": args.size, "guidance_scale": 5.0}  # fmt: skip
    eng, pipe = st.engine, st.engine.pipe

    def direct(seed: int) -> float:
        with eng._cv:  # the worker is idle between our sequential calls; keep its view of the merged adapter
            eng._set_adapter(iid, 1.0)
        t = time.perf_counter()
        with torch.inference_mode():
            pipe(req["prompt"], num_inference_steps=args.steps, width=args.size, height=args.size, guidance_scale=5.0,
                 generator=[torch.Generator("cpu").manual_seed(seed)], output_type="pil")  # fmt: skip
        return time.perf_counter() - t

    def served(seed: int) -> float:
        t = time.perf_counter()
        r = http.post("/v1/generations", json={**req, "seed": seed}, headers={"Accept": "image/png"})
        assert r.status_code == 200, r.text
        return time.perf_counter() - t

    served(0), direct(0)  # warm both paths
    lat_d, lat_s = [], []
    for i in range(args.reps):
        lat_d.append(direct(i))
        lat_s.append(served(i))
    n = args.concurrent
    t = time.perf_counter()
    for i in range(n):
        served(100 + i)
    seq_s = time.perf_counter() - t
    batches = []

    def one(i: int) -> None:
        r = http.post("/v1/generations", json={**req, "seed": 200 + i})
        assert r.status_code == 200, r.text
        batches.append(r.json()["info"]["batch_images"])

    t = time.perf_counter()
    with ThreadPoolExecutor(n) as ex:
        list(ex.map(one, range(n)))
    conc_s = time.perf_counter() - t
    server.should_exit = True
    th.join(timeout=60)

    md, ms = statistics.median(lat_d), statistics.median(lat_s)
    res = {
        "device": args.device, "threads": args.threads, "steps": args.steps, "size": args.size, "reps": args.reps,
        "predictor_trained": not world["untrained_hypernet"], "base_model": world["model_path"],
        "direct_median_s": round(md, 4), "served_median_s": round(ms, 4), "overhead_ratio": round(ms / md, 4),
        "overhead_ms": round((ms - md) * 1000, 2), "target_overhead_ratio": 1.10,
        "direct_s": [round(x, 4) for x in lat_d], "served_s": [round(x, 4) for x in lat_s],
        "throughput": {
            "requests": n, "sequential_s": round(seq_s, 3), "concurrent_s": round(conc_s, 3),
            "sequential_img_per_s": round(n / seq_s, 3), "concurrent_img_per_s": round(n / conc_s, 3),
            "speedup": round(seq_s / conc_s, 3), "batch_images_seen": sorted(batches),
        },
        "identity_seconds": ident["seconds"],
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, res, indent=2)
    tp = res["throughput"]
    rows = [
        ("direct pipeline, median", f"{md * 1000:.1f} ms"),
        ("POST /v1/generations, median", f"{ms * 1000:.1f} ms"),
        ("overhead_ratio (target <= 1.10)", f"{res['overhead_ratio']:.3f}"),
        (f"{n} requests sequential", f"{tp['sequential_s']:.2f} s ({tp['sequential_img_per_s']:.2f} img/s)"),
        (f"{n} requests concurrent (batched)", f"{tp['concurrent_s']:.2f} s ({tp['concurrent_img_per_s']:.2f} img/s)"),
        ("batching speedup", f"{tp['speedup']:.2f}x, batch sizes {tp['batch_images_seen']}"),
        ("identity create (faces / predict / total)",
         f"{ident['seconds']['faces']:.2f} / {ident['seconds']['predict']:.2f} / {ident['seconds']['total']:.2f} s"),
    ]  # fmt: skip
    w = max(len(a) for a, _ in rows)
    print(f"service bench: {args.device}, {args.threads} thread(s), {args.steps} steps, {args.size}x{args.size}")
    for a, b in rows:
        print(f"  {a.ljust(w)}  {b}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
