"""Fan the per-identity work out over a Ray cluster: one long-lived worker actor per GPU (or per CPU on CPU
clusters) keeps the base model, the face encoder and the prior latents loaded, and builds identity after identity;
a failed identity is retried (on any worker) and a worker process that dies is restarted by Ray.

Actors rather than tasks: Ray ends a GPU task's worker process after every task (``max_calls=1`` for tasks that
reserve GPUs, to free GPU memory), so a task per identity would load the models again for every identity."""

from __future__ import annotations

import os
import socket
from collections import deque
from collections.abc import Callable

from .build import IdentitySource, model_loads, run_identity

CONNECT_TIMEOUT_S = 10.0
# HTTP/2 client preface + an empty SETTINGS frame: a gRPC server (Ray's GCS and client server) answers with its own
# SETTINGS frame (9-byte header, type 0x4); anything else (an HTTP/1 server, a silent port) does not
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _host_port(address: str) -> tuple[str, int]:
    """(host, port) of "HOST:PORT", "[IPv6]:PORT" or "ray://HOST:PORT"; ValueError naming --ray-address."""
    hp = address.removeprefix("ray://")
    host, sep, port = hp.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--ray-address {address!r}: expected local, auto or HOST:PORT")
    return host, int(port)


def probe_ray_head(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """ConnectionError naming ``address`` ("HOST:PORT" or "ray://HOST:PORT") unless it accepts a TCP connection and
    answers as a gRPC server (as a Ray head's GCS port and its client port do) within ``timeout_s``."""
    host, port = _host_port(address)
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise ConnectionError(f"cannot reach the Ray cluster at {address}: {why}") from None
    head = b""
    with sock:
        try:
            sock.sendall(_H2_PREFACE)
            while len(head) < 9 and (chunk := sock.recv(9 - len(head))):
                head += chunk
        except OSError:
            pass  # reset or timed out: judged by what arrived before
    if len(head) < 9 or head[3] != 0x04:
        raise ConnectionError(
            f"{address} is not a Ray cluster: it accepts connections but does not answer as Ray's gRPC ports do "
            "(give the head's GCS address, HOST:6379 by default, or ray://HOST:10001)"
        )


def connect(address: str, timeout_s: float = CONNECT_TIMEOUT_S, num_cpus: int | None = None) -> None:
    """Start or join Ray ("local", "auto" or "HOST:PORT"; ``num_cpus`` caps a local instance).

    A HOST:PORT that does not accept a TCP connection, or does not answer as a gRPC server, within ``timeout_s``
    is a ConnectionError naming it: Ray's own client retries for minutes against an unreachable head (or a port
    that is not Ray's), and its C++ core aborts the process when it gives up, so the address is probed first.
    """
    try:
        import ray
    except ImportError:
        raise ValueError("--ray-address needs Ray, which is not installed (pip install 'ray[default]')") from None

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if address == "local":
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        return
    if address != "auto":
        probe_ray_head(address, timeout_s)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    except ConnectionError as e:
        raise ConnectionError(f"cannot join the Ray cluster at {address}: {' '.join(str(e).split())}") from None


class BuildWorker:
    """One Ray actor per GPU (per CPU on CPU clusters): builds identities one after another in one process, so the
    models ``build._worker_state`` loads stay loaded (``stats()`` tells how many times they were loaded)."""

    def __init__(self) -> None:
        self.built = 0

    def run(self, src: IdentitySource, cfg_dict: dict, out_dir: str) -> dict:
        rec = run_identity(src, cfg_dict, out_dir)
        self.built += 1
        return rec

    def stats(self) -> dict:
        return {"pid": os.getpid(), "model_loads": model_loads(), "built": self.built}


def num_workers(use_gpu: bool, todo: int, workers: int | None = None) -> int:
    """Worker actors to start: ``workers`` when given, else one per GPU (CPU) of the cluster; at most one per
    identity to build. ValueError for a CUDA build on a cluster without GPUs (the actors would wait forever)."""
    import ray

    have = int(ray.cluster_resources().get("GPU" if use_gpu else "CPU", 0))
    if use_gpu and have == 0:
        raise ValueError("the recipe's device is CUDA but the Ray cluster has no GPU (start the workers with GPUs)")
    return max(1, min(workers or have, todo))


def run_on_ray(
    todo: list[IdentitySource],
    cfg_dict: dict,
    out_dir: str,
    address: str,
    finished: Callable[[dict], None],
    failures: dict[str, str],
    *,
    max_retries: int = 2,
    workers: int | None = None,
) -> list[dict]:
    """Build every source on the cluster at ``address`` ("local", "auto" or "host:port") with
    :func:`num_workers` :class:`BuildWorker` actors (``num_gpus=1`` each when the recipe's device is CUDA).

    The workers write adapters and records into ``out_dir`` (a shared filesystem on a real cluster); the driver
    rewrites the manifest as results come in. An identity that still fails after ``max_retries`` retries is
    reported in ``failures`` and redone by the next run. Returns each worker's ``stats()``.
    """
    import ray
    from ray.exceptions import RayActorError

    connect(address)
    if not todo:
        return []
    use_gpu = cfg_dict.get("device", "cpu").startswith("cuda")
    if not use_gpu and not cfg_dict.get("threads"):
        cfg_dict = {**cfg_dict, "threads": 1}  # one worker per CPU: don't oversubscribe with torch's thread pool
    actor = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0, max_restarts=max_retries)(BuildWorker)
    pool = [actor.remote() for _ in range(num_workers(use_gpu, len(todo), workers))]
    queue, tries = deque(todo), dict.fromkeys((s.id for s in todo), 0)
    running: dict = {}  # object ref -> (worker, source)

    def submit(worker) -> None:
        if queue:
            src = queue.popleft()
            running[worker.run.remote(src, cfg_dict, out_dir)] = (worker, src)

    for w in pool:
        submit(w)
    while running:
        ready, _ = ray.wait(list(running), num_returns=1)
        worker, src = running.pop(ready[0])
        try:
            finished(ray.get(ready[0]))
        except Exception as e:  # noqa: BLE001 - RayTaskError wraps the worker's exception
            tries[src.id] += 1
            if tries[src.id] <= max_retries:
                queue.append(src)
            else:
                failures[src.id] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
        submit(worker)
    stats = []
    for w in pool:
        try:
            stats.append(ray.get(w.stats.remote()))
        except RayActorError:
            continue  # died for good (its identities were retried on the others)
        ray.kill(w)
    return stats
