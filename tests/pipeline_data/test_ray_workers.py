"""``data build --ray-address``: long-lived worker actors build several identities each with one model load (the
base model, face encoder and prior latents stay loaded), on a real local Ray instance shared by this module."""

from __future__ import annotations

import os

import pytest

from tests.utils.datasets import DATASET_IDS, FACES, build_config

ray = pytest.importorskip("ray")

IDS = [*DATASET_IDS, FACES / "orl" / "s2"]


@pytest.fixture(scope="module")
def local_ray():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_each_worker_builds_several_identities_with_one_model_load(local_ray, tmp_path) -> None:
    from pipeline_data.build import build

    summary = build([str(p) for p in IDS], tmp_path / "ds", build_config(steps=2), ray_address="local", progress=False)
    assert not summary["failed"], summary["failed"]
    assert summary["ok"] + len(summary["skipped"]) == len(IDS)
    workers = summary["workers"]
    assert len(workers) == 2 and len({w["pid"] for w in workers}) == 2  # one actor per CPU of the cluster
    assert sum(w["built"] for w in workers) == len(IDS)
    assert max(w["built"] for w in workers) >= 2  # a worker went on to another identity ...
    assert all(w["model_loads"] == 1 for w in workers)  # ... without loading the models again
    assert len(list((tmp_path / "ds" / "records").glob("*.json"))) == len(IDS)


def test_worker_count_follows_the_cluster_and_the_work(local_ray) -> None:
    from pipeline_data.ray_build import num_workers

    assert num_workers(False, 10) == 2  # one per CPU
    assert num_workers(False, 1) == 1  # never more than identities
    assert num_workers(False, 10, workers=5) == 5
    with pytest.raises(ValueError, match="device is CUDA but the Ray cluster has no GPU"):
        num_workers(True, 10)  # GPU actors on a cluster without GPUs would wait forever
