"""The one home of option checks, for every ``difflora`` subcommand and the service.

Two kinds, one rule each:

* argparse types (``positive_int``, ``nonnegative_float``, ...) refuse a bad string as it is parsed;
  :class:`OneLineParser` turns argparse's errors into one line (exit 2) instead of a usage dump;
* value checks (:func:`positive`, :func:`finite`, :func:`seed`, :func:`resolve_device`, :func:`writable_dir`,
  :func:`writable_file`) check values that Python callers pass too (``EvalConfig``, ``sample``, ``tune``, the
  service's settings, ``difflora batch``) and raise ``ValueError`` with one line naming the option and the value.

Either way a command fails before any long work instead of with a traceback (or after an hour of evaluation, with
the results lost). This module lives in ``pipeline_data``, the lowest package with a command line that needs it
(``weights`` checks its own few options), so ``hypernet`` and ``service`` import it without breaking the
dependency direction.

>>> positive(0, "--seeds")
Traceback (most recent call last):
ValueError: --seeds must be >= 1, got 0
"""

from __future__ import annotations

import argparse
import math
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class ArgError(Exception):
    """Bad command-line input; the message is one line and the CLI exits with 2."""


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise :class:`ArgError` (one line, no usage dump) instead of exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ArgError(f"{self.prog}: {message}")


def _bounds(value: float, lo: float | None, hi: float | None = None, strict: bool = False) -> str | None:
    """`"must be >= 1, got 0"` (or `> lo`, `<= hi`, `in [lo, hi]`) when `value` is out of bounds, else None."""
    if lo is not None and hi is not None and not lo <= value <= hi:
        return f"must be in [{_num(lo)}, {_num(hi)}], got {_num(value)}"
    if lo is not None and (value <= lo if strict else value < lo):
        return f"must be {'>' if strict else '>='} {_num(lo)}, got {_num(value)}"
    if hi is not None and value > hi:
        return f"must be <= {_num(hi)}, got {_num(value)}"
    return None


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _int_at_least(lo: int) -> Callable[[str], int]:
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if (msg := _bounds(v, lo)) is not None:
            raise argparse.ArgumentTypeError(msg)
        return v

    parse.__name__ = "int"  # argparse names the type in "invalid int value" messages
    return parse


positive_int = _int_at_least(1)
nonnegative_int = _int_at_least(0)


def _float_checked(lo: float | None, strict: bool) -> Callable[[str], float]:
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {s}")
        if (msg := _bounds(v, lo, strict=strict)) is not None:
            raise argparse.ArgumentTypeError(msg)
        return v

    parse.__name__ = "float"
    return parse


finite_float = _float_checked(None, False)
positive_float = _float_checked(0.0, True)
nonnegative_float = _float_checked(0.0, False)


MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed accepts up to 2**64 - 1; leave room for seed + sample index


def positive(value: int | None, flag: str) -> int | None:
    """``value`` if it is None or >= 1, else a ValueError naming ``flag``."""
    if value is not None and (msg := _bounds(value, 1)) is not None:
        raise ValueError(f"{flag} {msg}")
    return value


def finite(value: float | None, flag: str, lo: float | None = None, hi: float | None = None) -> float | None:
    """``value`` if it is None or a finite number within [lo, hi], else a ValueError naming ``flag``."""
    if value is None:
        return None
    if not math.isfinite(value):
        raise ValueError(f"{flag} must be a finite number, got {value}")
    if (msg := _bounds(value, lo, hi)) is not None:
        raise ValueError(f"{flag} {msg}")
    return value


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
    import torch

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


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace | int:
    """``parser.parse_args(argv)``, or the exit status: 0 after ``--help``, 2 after a one-line error on stderr."""
    import sys

    try:
        return parser.parse_args(argv)
    except ArgError as e:
        print(str(e), file=sys.stderr)
        return 2
    except SystemExit as e:  # --help / --version
        return int(e.code or 0)
