"""The model worker on a real tiny pipeline with random (non-zero) LoRA adapters: stock-diffusers equivalence, exact
restore across identity switches, same-identity batching, bounded queue, LRU cache, drain."""

from __future__ import annotations

import concurrent.futures as cf
import threading

import numpy as np
import pytest
import torch

from service.engine import Engine, EngineClosedError, GenParams, QueueFullError
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


def test_same_identity_requests_are_batched(pipe, adapters):
    eng = _engine(pipe, adapters, start=False, batch_wait_s=0.05)
    futs = [eng.submit_generate("a", P, ["p"], [i]) for i in range(3)]
    other = eng.submit_generate("b", P, ["p"], [0])
    eng.start()
    try:
        outs = [f.result() for f in futs]
        assert [o.batch_images for o in outs] == [3, 3, 3]
        assert other.result().batch_images == 1
        alone = eng.submit_generate("a", P, ["p"], [1]).result()
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
