"""Checks of user-given values (counts, floats, seeds, devices, output paths) and strict JSON output.

Every check raises ``ValueError`` with one line naming the option and the value, so a command fails before any
long work instead of with a traceback (or after an hour of evaluation, with the results lost). These check values
that Python callers pass too (``EvalConfig``, ``sample``, ``tune``) and ``difflora batch``'s options; argparse
types that refuse a bad string as it is parsed are in ``pipeline_data.cliargs``.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import Any

import torch

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed accepts up to 2**64 - 1; leave room for seed + sample index


def positive(value: int | None, flag: str) -> int | None:
    """``value`` if it is None or >= 1, else a ValueError naming ``flag``."""
    if value is not None and value < 1:
        raise ValueError(f"{flag} must be >= 1, got {value}")
    return value


def finite(value: float | None, flag: str, lo: float | None = None, hi: float | None = None) -> float | None:
    """``value`` if it is None or a finite number within [lo, hi], else a ValueError naming ``flag``."""
    if value is None:
        return None
    if not math.isfinite(value):
        raise ValueError(f"{flag} must be a finite number, got {value}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        if hi is None or lo is None:
            bounds = f">= {_num(lo)}" if hi is None else f"<= {_num(hi)}"
        else:
            bounds = f"in [{_num(lo)}, {_num(hi)}]"
        raise ValueError(f"{flag} must be {bounds}, got {_num(value)}")
    return value


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


MAX_REFINE_STEPS = 200  # refine's bound (CLI and service): ~0.2 s a step on the tiny model, so at most ~40 s


def refine_steps(value: int, flag: str = "--refine-steps") -> int:
    """A refine step count in 0 .. MAX_REFINE_STEPS (0: no refine)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_REFINE_STEPS:
        raise ValueError(f"{flag} must be an integer in 0 .. {MAX_REFINE_STEPS}, got {value!r}")
    return value


def seed(value: int, flag: str = "--seed") -> int:
    """A random seed in 0 .. 2**63 - 1 (what every generator here accepts, with room for ``seed + i``)."""
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"{flag} must be in 0 .. {MAX_SEED} (2**63 - 1), got {value}")
    return value


def resolve_device(device: str, available: bool = True) -> torch.device:
    """``auto`` (CUDA when available, else CPU) or a torch device string that exists on this machine
    (``available=False``: only a device torch and this project support, wherever it is, e.g. a deploy config)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if not available:
        if dev.type not in ("cpu", "cuda", "mps"):
            raise ValueError(f"device {device!r} is not supported; use auto, cpu, cuda or cuda:N")
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available to this torch install; use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device {device!r}: this machine has {n} CUDA device(s) (cuda:0 .. cuda:{n - 1})")
    elif dev.type not in ("cpu", "mps"):
        raise ValueError(f"device {device!r} is not supported; use auto, cpu, cuda or cuda:N")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available on this machine; use --device cpu")
    return dev


def writable_dir(folder: str | Path, flag: str) -> Path:
    """Check that files can be written into ``folder`` (an existing folder, or one that can be created): the
    nearest existing ancestor must be a folder that accepts a new file. Creates nothing that stays."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        what = "is not a folder" if probe == folder else f"cannot be created: {str(probe)!r} is not a folder"
        raise ValueError(f"{flag}: {str(folder)!r} {what}")
    tmp = probe / f".difflora-write-check.{secrets.token_hex(6)}.tmp"
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(tmp)
    except OSError as e:
        raise ValueError(f"{flag}: cannot write into {str(probe)!r} ({e.strerror})") from None
    return folder


def writable_file(path: str | Path, flag: str) -> Path:
    """Check that ``path`` can be written (atomically) before the work that produces it starts."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag}: {str(path)!r} is a folder; give a file name")
    writable_dir(path.parent, flag)
    return path


def json_safe(obj: Any) -> Any:
    """A copy of ``obj`` (dicts, lists, tuples, scalars) with NaN and ±inf replaced by None (JSON null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj: Any, **kw: Any) -> str:
    """Strict JSON (no bare NaN/Infinity tokens: non-finite floats become null); ``kw`` as for ``json.dumps``."""
    return json.dumps(json_safe(obj), allow_nan=False, **kw)
