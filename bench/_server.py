"""Shared by the service benchmarks: a free loopback port and the model settings of the bundled tiny world."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_world(tmp: Path) -> dict:
    """``model_path`` / ``untrained_hypernet`` settings: the bundled tiny base (and hypernet when committed), or a
    tiny pipeline built from config in ``tmp`` where the assets are absent."""
    from pipeline_data.models import TINY_BASE
    from service.settings import TINY_HYPERNET

    if (TINY_BASE / "model_index.json").is_file():
        return {"model_path": str(TINY_BASE), "untrained_hypernet": not (TINY_HYPERNET / "config.json").is_file()}
    from tests.utils.tiny_pipes import tiny_sd15_pipe

    tiny_sd15_pipe().save_pretrained(tmp / "base")
    return {"model_path": str(tmp / "base"), "untrained_hypernet": True}


def stop_server(proc: subprocess.Popen, log=None, timeout: float = 60) -> None:
    """SIGTERM, wait for the drain, SIGKILL if it does not exit; close the log file."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
    if log is not None:
        log.close()
