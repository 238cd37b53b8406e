"""Argument parsing shared by the ``difflora data|tiny|faces`` CLIs: one-line errors and checked number types.

These check a string as argparse parses it; checks of values that Python callers pass too are in
``hypernet.checks`` (used by the hypernet and batch CLIs).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


class ArgError(Exception):
    """Bad command-line input; the message is one line and the CLI exits with 2."""


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise :class:`ArgError` (one line, no usage dump) instead of exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ArgError(f"{self.prog}: {message}")


def _int_at_least(lo: int) -> Callable[[str], int]:
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
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
        if lo is not None and (v <= lo if strict else v < lo):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {lo:g}, got {v:g}")
        return v

    parse.__name__ = "float"
    return parse


finite_float = _float_checked(None, False)
positive_float = _float_checked(0.0, True)
nonnegative_float = _float_checked(0.0, False)


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
