"""``difflora batch --ray-address`` with ``--device cuda`` reserves one GPU per task: on a local Ray instance that
declares two GPUs (Ray schedules declared GPUs the same way; no CUDA is needed to see the reservation), two tasks
with the batch's options run at once on different GPUs, each seeing only its own as ``CUDA_VISIBLE_DEVICES``. No
GPU run is faked: what runs on the "GPUs" is a probe that reports what Ray gave it."""

from __future__ import annotations

import argparse
import os
import time

import pytest

from service.batch import build_parser, ray_task_options, ray_worker_args

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_with_two_gpus():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _probe() -> tuple[list, str | None, float]:
    t0 = time.time()
    time.sleep(1.0)  # hold the reservation, so the two tasks overlap
    return [int(g) for g in ray.get_gpu_ids()], os.environ.get("CUDA_VISIBLE_DEVICES"), t0


@pytest.mark.parametrize(("device", "gpus"), [("cuda", 1), ("cuda:1", 1), ("cpu", 0)])
def test_task_options(device: str, gpus: int) -> None:
    assert ray_task_options(device) == {"num_cpus": 1, "num_gpus": gpus, "max_retries": 2}


def test_cuda_index_becomes_the_gpu_ray_reserved() -> None:
    args = build_parser().parse_args(["--faces", "f", "--prompts", "p", "--out", "o", "--device", "cuda:3"])
    assert ray_worker_args(args).device == "cuda" and args.device == "cuda:3"
    cpu = argparse.Namespace(device="cpu")
    assert ray_worker_args(cpu) is cpu


def test_cuda_tasks_each_get_their_own_gpu(ray_with_two_gpus) -> None:
    task = ray.remote(**ray_task_options("cuda"))(_probe)
    (g1, v1, t1), (g2, v2, t2) = ray.get([task.remote(), task.remote()])
    assert len(g1) == len(g2) == 1 and {g1[0], g2[0]} == {0, 1}  # one GPU each, not both on GPU 0
    assert {v1, v2} == {"0", "1"}  # each task sees only its own GPU (so "cuda" in the task is that GPU)
    assert abs(t1 - t2) < 0.9  # and they ran at the same time
    third = ray.remote(**ray_task_options("cpu"))(_probe)
    assert ray.get(third.remote())[0] == []  # a CPU task reserves no GPU


def test_cuda_batch_on_a_cpu_driver_is_not_refused_for_the_drivers_lack_of_cuda(tmp_path) -> None:
    """The device must exist on the Ray workers, not on the driver: the option check lets it through."""
    from service.batch import _bad_args

    args = build_parser().parse_args(
        ["--faces", str(tmp_path), "--prompts", "p", "--out", "o", "--device", "cuda", "--ray-address", "auto"]
    )
    assert _bad_args(args) is None
    args.ray_address = None
    import torch

    if not torch.cuda.is_available():
        assert "--device" in _bad_args(args)
