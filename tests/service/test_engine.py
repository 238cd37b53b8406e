"""The model worker on a real tiny pipeline with random (non-zero) LoRA adapters: stock-diffusers equivalence, exact
restore across identity switches, same-identity and mixed-identity batching (on the bundled tiny base with adapters
the bundled hypernet predicts from photos), bounded queue, LRU cache, drain."""

from __future__ import annotations

import concurrent.futures as cf
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from service.engine import Engine, EngineClosedError, GenParams, QueueFullError
from service.request_id import current_request_id
from tests.utils.adapters import make_adapter
from tests.utils.tiny_pipes import tiny_sd15_pipe

P = GenParams(steps=3, width=32, height=32, guidance_scale=5.0)


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd15_pipe()


@pytest.fixture(scope="module")
def adapters(pipe):
    return {n: make_adapter(pipe.unet, "lora", rank=4, seed=i, noise=3.0) for i, n in enumerate("abc")}


def _engine(pipe, adapters, loads=None, start=True, **kw) -> Engine:
    def loader(ident):
        if loads is not None:
            loads.append(ident)
        return adapters[ident]

    eng = Engine(pipe, None, adapter_loader=loader, batch_wait_s=kw.pop("batch_wait_s", 0.0), **kw)
    if start:
        eng.start()
    return eng


def _arr(img) -> np.ndarray:
    return np.asarray(img, dtype=np.float32) / 255.0


def test_matches_stock_diffusers_and_restores_exactly(pipe, adapters, tmp_path):
    from weights.io import save_adapter

    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    eng = _engine(pipe, adapters)
    try:
        base = eng.submit_generate(None, P, ["a photo of sks person"], [1]).result().images[0]
        ours = eng.submit_generate("a", P, ["a photo of sks person"], [1]).result().images[0]
        eng.submit_generate("b", P, ["x"], [2]).result()  # switch a -> b -> base
        again = eng.submit_generate(None, P, ["a photo of sks person"], [1]).result().images[0]
    finally:
        eng.stop()
    assert np.abs(_arr(ours) - _arr(base)).mean() > 0.005  # the adapter really changes the image
    assert np.array_equal(np.asarray(base), np.asarray(again))  # exact restore: same pixels as before
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, before[k]), k
    f = tmp_path / "pytorch_lora_weights.safetensors"
    save_adapter(adapters["a"], f, "diffusers")
    stock = tiny_sd15_pipe()
    stock.load_lora_weights(str(tmp_path), weight_name=f.name)
    stock.fuse_lora(lora_scale=1.0)
    g = torch.Generator("cpu").manual_seed(1)
    theirs = stock("a photo of sks person", num_inference_steps=3, width=32, height=32, guidance_scale=5.0,
                   generator=[g], output_type="pil").images[0]  # fmt: skip
    assert np.abs(np.asarray(ours, np.int16) - np.asarray(theirs, np.int16)).max() <= 1


@pytest.mark.parametrize("mixed", [False, True])
def test_same_identity_requests_are_batched(pipe, adapters, mixed):
    eng = _engine(pipe, adapters, start=False, batch_wait_s=0.05, mixed_batches=mixed)
    futs = [eng.submit_generate("a", P, ["p"], [i]) for i in range(3)]
    other = eng.submit_generate("b", P, ["p"], [0])
    eng.start()
    try:
        outs = [f.result() for f in futs]
        # mixed batches off: one identity per call (the old engine); on: b joins a's call with per-sample adapters
        assert [o.batch_images for o in outs] == ([4, 4, 4] if mixed else [3, 3, 3])
        assert {o.batch_mode for o in outs} == {"per_sample" if mixed else "merged"}
        assert other.result().batch_images == (4 if mixed else 1)
        alone = eng.submit_generate("a", P, ["p"], [1]).result()
        assert alone.batch_mode == "merged"  # one identity: merged
    finally:
        eng.stop()
    # a seed gives its own image alone or in a batch, up to rounding. The BLAS blocks a batch of 6 differently from
    # one of 2 (the first difference, ~2e-7, is in time_embedding.linear_1 with or without an adapter), and the
    # strong random test adapter amplifies that over the steps: under 1.0 on the CPUs the old bound was set on, 2.7
    # (max 17) on an AVX2-only AMD EPYC at 1 thread, where other seeds' images differ by 43.
    alone_px = np.asarray(alone.images[0], np.int16)
    diffs = [np.abs(np.asarray(o.images[0], np.int16) - alone_px).mean() for o in outs]
    assert diffs[1] < 4.0 and diffs[1] < 0.25 * min(diffs[0], diffs[2]), diffs


def test_bounded_queue(pipe, adapters):
    eng = _engine(pipe, adapters, start=False, queue_size=2)
    futs = [eng.submit_generate(None, P, ["p"], [i]) for i in range(2)]
    with pytest.raises(QueueFullError) as e:
        eng.submit_generate(None, P, ["p"], [9])
    assert e.value.retry_after >= 1
    eng.start()
    eng.stop()  # drain: queued work finishes
    assert all(f.done() and f.exception() is None for f in futs)
    with pytest.raises(EngineClosedError):
        eng.submit_generate(None, P, ["p"], [0])


def test_lru_cache(pipe, adapters):
    loads: list[str] = []
    eng = _engine(pipe, adapters, loads=loads, cache_size=2)
    try:
        for ident in "abca":
            eng.submit_generate(ident, GenParams(steps=1, width=16, height=16), ["p"], [0]).result()
    finally:
        eng.stop()
    assert loads == ["a", "b", "c", "a"]  # a was evicted by c
    assert eng.cached() == ["c", "a"]


def test_worker_failure_reaches_the_caller_and_the_worker_survives(pipe, adapters):
    eng = _engine(pipe, {"bad": make_adapter(tiny_sd15_pipe(seed=5).unet, rank=2)})
    eng.adapter_loader = lambda ident: (_ for _ in ()).throw(FileNotFoundError(ident))
    try:
        with pytest.raises(FileNotFoundError):
            eng.submit_generate("zzz", P, ["p"], [0]).result()
        assert eng.submit_generate(None, P, ["p"], [0]).result().images
    finally:
        eng.stop()


def test_calls_come_back_on_other_threads(pipe, adapters):
    """Model calls run on the worker thread, never on the caller's (the event loop's) thread."""
    eng = _engine(pipe, adapters)
    seen = []
    orig = eng._run_generate

    def spy(tasks):
        seen.append(threading.current_thread().name)
        return orig(tasks)

    eng._run_generate = spy
    try:
        cf.wait([eng.submit_generate(None, P, ["p"], [0])])
    finally:
        eng.stop()
    assert seen == ["difflora-model-worker"]


@pytest.mark.parametrize("scheduler", ["euler_a", "dpmpp_2m"])
def test_sdxl_pipeline_and_schedulers(scheduler):
    from tests.utils.tiny_pipes import tiny_sdxl_pipe

    xl = tiny_sdxl_pipe()
    ad = make_adapter(xl.unet, "lora", rank=2, seed=1, noise=3.0)
    eng = _engine(xl, {"x": ad})
    p = GenParams(steps=2, width=32, height=32, negative_prompt="blurry", scheduler=scheduler)
    try:
        a = eng.submit_generate("x", p, ["a photo", "a photo"], [3, 4]).result()
        b = eng.submit_generate("x", p, ["a photo"], [3]).result()
    finally:
        eng.stop()
    assert len(a.images) == 2 and a.images[0].size == (32, 32)
    assert np.abs(np.asarray(a.images[0], np.int16) - np.asarray(b.images[0], np.int16)).mean() < 1.0


# ---- mixed-identity batches on the real tiny world ----------------------------------------------------------------
FACES = Path(os.environ.get("DIFFLORA_FACES", str(Path(__file__).resolve().parents[3] / "shared" / "data" / "faces")))
PEOPLE = ["Aaron_Peirsol", "Abdullah_Gul", "Abel_Pacheco", "Abdoulaye_Wade"]  # LFW folders


@pytest.fixture(scope="module")
def world():
    """The bundled tiny base and one adapter per LFW person, predicted by the bundled hypernet from two photos."""
    from hypernet.predict import Predictor
    from pipeline_data.faces import get_encoder
    from pipeline_data.models import TINY_BASE, load_pipeline
    from service.settings import TINY_HYPERNET

    if not (TINY_HYPERNET / "config.json").is_file() or not (FACES / "lfw").is_dir():
        pytest.skip("needs the bundled tiny hypernet and the shared LFW photos")
    base = load_pipeline(str(TINY_BASE))
    base.set_progress_bar_config(disable=True)
    enc = get_encoder("dlib")
    embs = [np.stack([enc.embed(str(f)).embedding for f in sorted((FACES / "lfw" / p).iterdir())[:2]]) for p in PEOPLE]
    return base, dict(zip(PEOPLE, Predictor.load(TINY_HYPERNET).predict_batch(embs, seed=0)))


def test_mixed_identity_batch_equals_each_identity_generated_alone(world):
    base, ads = world
    assert {a.spec.method for a in ads.values()} == {"lora"}
    prompt = ["a photo of sks person"]
    half = GenParams(**{**P.__dict__, "adapter_scale": 0.5, "width": 64, "height": 64})
    p64 = GenParams(**{**P.__dict__, "width": 64, "height": 64})
    reqs = [(PEOPLE[0], p64), (PEOPLE[1], p64), (PEOPLE[2], half), (PEOPLE[3], p64), (None, p64)]  # + the base model
    eng = _engine(base, ads, start=False)
    futs = [eng.submit_generate(ident, p, prompt, [0]) for ident, p in reqs]
    eng.start()
    try:
        outs = [f.result() for f in futs]
        alone = [eng.submit_generate(ident, p, prompt, [0]).result() for ident, p in reqs]
        other_seed = [f.result() for f in [eng.submit_generate(ident, p, prompt, [1]) for ident, p in reqs]]
    finally:
        eng.stop()
    assert {(o.batch_mode, o.batch_images, o.batch_identities) for o in outs} == {("per_sample", 5, 5)}
    assert {o.batch_mode for o in alone} == {"merged"}
    px = [np.asarray(o.images[0], np.int16) for o in outs]
    ref = [np.asarray(o.images[0], np.int16) for o in alone]
    ctl = [np.asarray(o.images[0], np.int16) for o in other_seed]
    for i in range(len(reqs)):
        same = np.abs(px[i] - ref[i]).mean()
        # the tolerance of test_same_identity_requests_are_batched, against two controls: the same identity with
        # another seed, and the other identities (and the base model) with the same seed
        others = [np.abs(px[i] - ref[j]).mean() for j in range(len(reqs)) if j != i]
        assert same < 4.0 and same < 0.25 * np.abs(px[i] - ctl[i]).mean() and same < 0.25 * min(others), (i, same)


def test_other_families_join_through_their_lora_export_when_exact_and_failures_stay_with_their_request(
    pipe, adapters, caplog
):
    # LoLDU's ΔW has rank r: its rank-r LoRA export is exact (1e-7); DoRA's is not (0.8): it runs merged, alone
    ads = {**adapters, "d": make_adapter(pipe.unet, "dora", rank=4, seed=7, noise=3.0),
           "l": make_adapter(pipe.unet, "loldu", rank=4, seed=8, noise=3.0)}  # fmt: skip

    def loader(ident):
        if ident == "gone":
            raise FileNotFoundError(ident)  # a deleted identity: its adapter file is gone
        return ads[ident]

    eng = Engine(pipe, None, adapter_loader=loader, batch_wait_s=0.0)
    futs = {}
    for k in ("a", "d", "gone", "l", "b"):
        token = current_request_id.set(f"rid-{k}")  # as the HTTP layer sets it for the request's context
        futs[k] = eng.submit_generate(k, P, ["p"], [3])
        current_request_id.reset(token)
    eng.start()
    try:
        with pytest.raises(FileNotFoundError):
            futs["gone"].result()
        out = {k: futs[k].result() for k in "adlb"}
        alone = {k: eng.submit_generate(k, P, ["p"], [3]).result() for k in "adlb"}
    finally:
        eng.stop()
    assert {(out[k].batch_mode, out[k].batch_images) for k in "alb"} == {("per_sample", 3)}
    assert (out["d"].batch_mode, out["d"].batch_images) == ("merged", 1)
    px = {k: np.asarray(out[k].images[0], np.int16) for k in "adlb"}
    ref = {k: np.asarray(alone[k].images[0], np.int16) for k in "adlb"}
    for k in "adlb":
        same = np.abs(px[k] - ref[k]).mean()
        assert same < 4.0 and all(same < 0.25 * np.abs(px[k] - ref[j]).mean() for j in "adlb" if j != k), (k, same)
    assert eng.metrics.batches.labels("per_sample")._value.get() == 1
    gone = [r.getMessage() for r in caplog.records if "adapter unavailable" in r.getMessage()]
    assert gone == ["identity gone: adapter unavailable (FileNotFoundError; requests rid-gone)"]
