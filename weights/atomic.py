"""The one atomic file writer: every file this project writes goes through here (or through a caller of it).

A temp file in the target's folder is written, flushed and fsynced, then ``os.replace``d over the target, so a
reader sees the old file or the new one, never a torn one, even after a crash or a power cut. An OSError names the
target (or the parent that is in the way), never the temp file; the temp file never outlives a failed write.

>>> atomic_write_json("out/result.json", {"ok": True}, indent=2)
"""

from __future__ import annotations

import errno
import json
import os
import secrets
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text"]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory and ``os.replace``. An OSError names
    ``path`` (or the parent that is in the way), never the temp file."""
    p = Path(path)
    for parent in (p.parent, *p.parent.parents):
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "a file is in the way of the output folder", str(parent))
            break
    if p.is_dir():
        raise IsADirectoryError(errno.EISDIR, "the output is a folder", str(p))
    # not mkstemp: its 0600 would make these files unlike every other the process writes; 0666 & ~umask instead
    tmp = str(p.parent / f".{p.name}.{secrets.token_hex(6)}.tmp")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise type(e)(e.errno, e.strerror, str(p)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None:
            raise type(e)(e.errno, e.strerror, str(p)) from None
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps_kw: Any) -> None:
    """``obj`` as JSON (``json.dumps(obj, **dumps_kw)``) plus a final newline, written atomically."""
    atomic_write_text(path, json.dumps(obj, **dumps_kw) + "\n")
