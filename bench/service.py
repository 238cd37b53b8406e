"""Service overhead and batching throughput, measured in one process on one machine.

* ``overhead_ratio``: median latency of ``POST /v1/generations`` (real uvicorn on loopback, HTTP client in this
  process, PNG response) over the median of calling the same pipeline directly with the same adapter merged.
* throughput: N concurrent requests for the same identity (the worker batches them) vs the same N one after another.
* ``mixed_identities``: the case that matters for a service used by many people — ``--concurrent`` requests for as
  many *different* identities at once, mixed batches (one UNet batch with per-sample adapters) vs the engine without
  them (``mixed_batches=False``: one identity per model call, swap → run → restore), rounds alternating between the
  two, throughput and p50/p99 latency. On the tiny model through the real server (identities created from photos
  of LFW people, adapters predicted by the bundled hypernet), and on the SD 1.5-size pipeline built from its public
  config (random weights, rank-4 random LoRAs on the recipe's targets; ``--sd15-size`` latent side x8, few steps)
  through the engine directly. ``rule``: what the per-batch merge-or-per-sample rule rests on — one UNet forward
  without adapters, with one per-sample adapter for all rows, with 8 per-sample adapters, and the merge swap cost.

Usage: ``python bench/service.py [--steps 20] [--size 64] [--reps 10] [--concurrent 8] [--threads 1]
[--rounds 4] [--sd15-steps 2] [--sd15-size 64] [--sd15-rounds 2] [--no-sd15]``
Writes ``bench/results/service.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import io
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

FACES = faces_dir()
PHOTOS = FACES / "photos"


def _pct(xs: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(xs), q))


def concurrent_round(call, n: int) -> tuple[float, list[float], list]:
    """``call(i)`` from n threads released together: (wall seconds, per-request latencies, results)."""
    barrier = threading.Barrier(n)

    def one(i: int):
        barrier.wait()
        t = time.perf_counter()
        out = call(i)
        return t, time.perf_counter(), out

    with ThreadPoolExecutor(n) as ex:
        res = list(ex.map(one, range(n)))
    return max(r[1] for r in res) - min(r[0] for r in res), [r[1] - r[0] for r in res], [r[2] for r in res]


def mixed_vs_old(call, set_mixed, n: int, rounds: int, warmup: bool = True) -> dict:
    """Rounds of n concurrent requests, alternating old engine / mixed batches (one warm-up round each first)."""
    runs: dict[str, dict] = {
        m: {"wall_s": [], "latency_s": [], "batches": [], "outputs": None} for m in ("old", "mixed")
    }
    for r in range(0 if warmup else 1, rounds + 1):
        for mode in ("old", "mixed") if r % 2 == 0 else ("mixed", "old"):
            set_mixed(mode == "mixed")
            wall, lat, outs = concurrent_round(call, n)
            if r == 0:
                continue  # warm-up
            run = runs[mode]
            run["wall_s"].append(round(wall, 4))
            run["latency_s"] += [round(x, 4) for x in lat]
            run["batches"].append(sorted(o["batch_images"] for o in outs))
            run["outputs"] = [o["image"] for o in outs]
    res: dict = {"requests_per_round": n, "rounds": rounds}
    for mode, run in runs.items():
        res[mode] = {
            "img_per_s": round(n * rounds / sum(run["wall_s"]), 4),
            "p50_s": round(statistics.median(run["latency_s"]), 4),
            "p99_s": round(_pct(run["latency_s"], 99), 4),
            "wall_s": run["wall_s"],
            "latency_s": run["latency_s"],
            "batch_images_seen": run["batches"],
        }
    res["speedup"] = round(res["mixed"]["img_per_s"] / res["old"]["img_per_s"], 3)
    res["p99_ratio"] = round(res["mixed"]["p99_s"] / res["old"]["p99_s"], 3)
    res["meets_target"] = res["speedup"] >= 1.5 and res["p99_ratio"] <= 1.0
    # the same request (identity, seed) in both modes: mean |Δ| in 0..255 pixel levels (the engine test's bound: 4)
    diffs = [_mean_abs(a, b) for a, b in zip(runs["old"]["outputs"], runs["mixed"]["outputs"])]
    res["max_mean_abs_diff_vs_old"] = round(max(diffs), 4)
    return res


def _mean_abs(a, b) -> float:
    import numpy as np

    return float(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean())


def rule_numbers(pipe, adapters: list, size: int, steps: int, reps: int, warm: bool = True) -> dict:
    """UNet forward seconds (median of ``reps``) for 2 rows (one image with CFG) and 16 (eight): no adapter,
    one per-sample adapter for every row, a different per-sample adapter per image; and the merge swap (apply one
    identity's adapter over another's) and apply + restore from the base model. ``per_sample_extra_per_call_s``:
    what per-sample costs over a merged model in one generation call (steps x forward difference), to weigh
    against ``merge_swap_s``."""
    import torch

    from weights.apply import apply_adapter, restore
    from weights.per_sample import batch_rows, per_sample_adapters, stack_adapters

    unet = pipe.unet
    lat = size // pipe.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    ctx_len = min(77, pipe.tokenizer.model_max_length)
    out: dict = {"latent": lat, "steps": steps, "unet_forward_s": {}}

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    with torch.inference_mode():
        for rows in (2, 16):
            x = torch.randn(rows, unet.config.in_channels, lat, lat, generator=g)
            ctx = torch.randn(rows, ctx_len, unet.config.cross_attention_dim, generator=g)
            t = torch.full((rows,), 500)
            k = min(rows // 2, len(adapters))
            configs = {  # name -> (stacked adapters, row map) or None for the plain UNet
                "base": None,
                "per_sample_one_adapter": (stack_adapters(adapters[:1]), [0] * rows),
                f"per_sample_{k}_adapters": (
                    stack_adapters(adapters[:k]),
                    batch_rows([i % k for i in range(rows // 2)], cfg=True),
                ),
            }
            times: dict[str, list[float]] = {name: [] for name in configs}
            for rep in range(reps + (1 if warm else 0)):  # interleaved: a busy machine slows all configs alike
                for name, cfg in configs.items():
                    fwd = lambda x=x, t=t, ctx=ctx: unet(x, t, encoder_hidden_states=ctx)  # noqa: E731
                    if cfg is None:
                        dt = timed(fwd)
                    else:
                        with per_sample_adapters(unet, cfg[0], cfg[1], freeze_base=False):
                            dt = timed(fwd)
                    if rep or not warm:
                        times[name].append(dt)
            row = {name: round(statistics.median(ts), 5) for name, ts in times.items()}
            out["unet_forward_s"][f"rows_{rows}"] = row
            out.setdefault("per_sample_extra_per_call_s", {})[f"rows_{rows}"] = round(
                steps * (row["per_sample_one_adapter"] - row["base"]), 4
            )
        flip = iter(range(10**6))
        swaps = [timed(lambda: apply_adapter(unet, adapters[next(flip) % 2])) for _ in range(max(3, reps))]
        restore(unet)
        out["merge_swap_s"] = round(statistics.median(swaps), 5)
        out["apply_restore_s"] = round(
            statistics.median(timed(lambda: (apply_adapter(unet, adapters[0]), restore(unet))) for _ in range(3)), 5
        )
    extra = out["per_sample_extra_per_call_s"]
    out["merge_cheaper_for_one_identity"] = out["merge_swap_s"] < min(extra.values())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--concurrent", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=4, help="tiny mixed-identity rounds per mode")
    ap.add_argument("--sd15-steps", type=int, default=1, help="SD 1.5-size case: denoising steps")
    ap.add_argument("--sd15-size", type=int, default=64, help="SD 1.5-size case: image side (latent = side / 8)")
    ap.add_argument("--sd15-rounds", type=int, default=2, help="SD 1.5-size case: rounds per mode")
    ap.add_argument("--no-sd15", dest="sd15", action="store_false", help="skip the SD 1.5-size case")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "service.json"))
    args = ap.parse_args(argv)

    import httpx
    import torch
    import uvicorn
    from PIL import Image

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

    # ---- n concurrent requests for n different identities, through the server ----
    idents = _lfw_identities(http, n)
    mreq = {k: v for k, v in req.items() if k != "identity_id"}

    def call_http(i: int) -> dict:
        r = http.post("/v1/generations", json={**mreq, "identity_id": idents[i], "seed": 300 + i},
                      headers={"Accept": "image/png"})  # fmt: skip
        assert r.status_code == 200, r.text
        return {"batch_images": int(r.headers["X-Batch-Images"]), "image": Image.open(io.BytesIO(r.content))}

    def set_mixed(on: bool) -> None:
        eng.mixed_batches = on  # read by the worker once per batch; it is idle between rounds

    mixed_tiny = {"model": "tiny (bundled base, HTTP)", "steps": args.steps, "size": args.size,
                  **mixed_vs_old(call_http, set_mixed, n, args.rounds)}  # fmt: skip
    server.should_exit = True
    th.join(timeout=60)
    mixed_tiny["rule"] = rule_numbers(pipe, [eng._adapter(i) for i in idents], args.size, args.steps, reps=5)
    mixed = {"target_speedup": 1.5, "tiny": mixed_tiny}
    if args.sd15:
        mixed["sd15"] = sd15_case(args, n)

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
        "mixed_identities": mixed,
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
    for key, m in mixed.items():
        if key == "target_speedup":
            continue
        for mode in ("old", "mixed"):
            r = m[mode]
            rows.append((f"{key}: {n} identities at once, {mode}",
                         f"{r['img_per_s']:.3f} img/s, p50 {r['p50_s']:.2f} s, p99 {r['p99_s']:.2f} s"))  # fmt: skip
        gain = f"{m['speedup']:.2f}x, p99 ratio {m['p99_ratio']:.2f}, max |diff| {m['max_mean_abs_diff_vs_old']}"
        rows.append((f"{key}: mixed vs old (target >= 1.5x, p99 <= 1)", gain))
        ru = m["rule"]
        rows.append((f"{key}: merge swap vs per-sample extra per call",
                     f"{ru['merge_swap_s'] * 1000:.1f} ms vs {ru['per_sample_extra_per_call_s']} s"))  # fmt: skip
    w = max(len(a) for a, _ in rows)
    print(f"service bench: {args.device}, {args.threads} thread(s), {args.steps} steps, {args.size}x{args.size}")
    for a, b in rows:
        print(f"  {a.ljust(w)}  {b}")
    return 0


def _lfw_identities(http, n: int) -> list[str]:
    """n identities made through the API from two photos each of the first LFW people with a usable face."""
    ids: list[str] = []
    for folder in sorted(p for p in (FACES / "lfw").iterdir() if p.is_dir()):
        photos = sorted(f for f in folder.iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png"))[:2]
        if len(photos) < 2:
            continue
        files = [("photos", (p.name, p.read_bytes(), "image/jpeg")) for p in photos]
        r = http.post("/v1/identities", files=files, data={"name": folder.name})
        if r.status_code == 201:
            ids.append(r.json()["id"])
        if len(ids) == n:
            return ids
    raise RuntimeError(f"found only {len(ids)} LFW identities with usable faces")


def sd15_case(args, n: int) -> dict:
    """The mixed-identity case on the SD 1.5-size pipeline (random weights) through the engine directly."""
    from pipeline_data.recipe import FULL_TARGETS
    from scripts.gpu_smoke import build_sd15_from_config
    from service.engine import Engine, GenParams
    from tests.utils.adapters import make_adapter

    t0 = time.perf_counter()
    pipe = build_sd15_from_config()
    ads = {
        f"id{i}": make_adapter(pipe.unet, "lora", rank=4, targets=FULL_TARGETS, seed=i, noise=0.1) for i in range(n)
    }
    build_s = time.perf_counter() - t0
    eng = Engine(pipe, None, adapter_loader=ads.__getitem__, queue_size=64, max_batch_images=max(8, n),
                 batch_wait_s=0.005, threads=args.threads)  # fmt: skip
    for k, a in ads.items():
        eng.cache_put(k, a)  # as after the identities' first use
    p = GenParams(steps=args.sd15_steps, width=args.sd15_size, height=args.sd15_size, guidance_scale=5.0)
    eng.start()

    def call(i: int) -> dict:
        out = eng.submit_generate(f"id{i}", p, ["a photo of a person"], [300 + i]).result()
        return {"batch_images": out.batch_images, "image": out.images[0]}

    def set_mixed(on: bool) -> None:
        eng.mixed_batches = on

    try:
        call(0)  # warm-up (page in the weights, the merged-originals copy)
        res = mixed_vs_old(call, set_mixed, n, args.sd15_rounds, warmup=False)
    finally:
        eng.stop()
    rule = rule_numbers(pipe, list(ads.values()), args.sd15_size, args.sd15_steps, reps=1, warm=False)
    model = "SD 1.5-size UNet/VAE/text encoder from config (random weights, engine)"
    return {"model": model, "steps": args.sd15_steps, "size": args.sd15_size, "build_s": round(build_s, 1), **res,
            "rule": rule}  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
