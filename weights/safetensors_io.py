"""Defensive safetensors reading and atomic writing (the only weight format this project reads or writes).

The header is parsed and checked by hand before safetensors touches the file, so a pickle renamed
``.safetensors``, a truncated download, a header bomb or a non-float tensor gives one clear
:class:`AdapterFileError` instead of a traceback from deep inside a library.
"""

from __future__ import annotations

import json
import os
import struct

import torch
from torch import Tensor

from .atomic import atomic_write_bytes
from .errors import AdapterFileError

MAX_FILE_BYTES = 4 << 30  # refuse adapter files above 4 GiB
MAX_HEADER_BYTES = 64 << 20  # refuse JSON headers above 64 MiB (header bomb)
_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}  # floating dtypes an adapter may hold, with their sizes
_INT_DTYPES = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}  # allowed only where a caller says so


def _sniff(head: bytes) -> str | None:
    """Name a well-known non-safetensors file type from its first bytes."""
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a pickle file (e.g. torch.save / .ckpt / .bin)"
    if head[:4] == b"PK\x03\x04":
        return "a zip archive (a torch.save checkpoint?)"
    if head[:1] in (b"{", b"["):
        return "a JSON/text file"
    if head[:4] == b"\x89HDF":
        return "an HDF5 file"
    return None


def _raise_sniffed(head: bytes, p: str) -> None:
    what = _sniff(head)
    if what:
        reason = "pickle" if "pickle" in what or "zip" in what else "not_safetensors"
        raise AdapterFileError(f"is {what}, not safetensors; refusing to load it", reason, p)


def read_header(
    path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES, allow_int: bool = False
) -> tuple[dict, dict]:
    """``(tensor entries, __metadata__)`` of a safetensors file, validated against the file size."""
    p = str(path)
    try:
        size = os.path.getsize(p)
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise AdapterFileError(f"file is too short ({size} bytes) to be safetensors", "truncated", p)
            (n,) = struct.unpack("<Q", head)
            if size > max_bytes:
                raise AdapterFileError(f"file is {size} bytes, above the limit of {max_bytes}", "too_large", p)
            if n > size - 8 or n > MAX_HEADER_BYTES or head[:2] == b"PK":
                _raise_sniffed(head, p)
            if n > MAX_HEADER_BYTES:
                raise AdapterFileError(
                    f"safetensors header claims {n} bytes (limit {MAX_HEADER_BYTES})", "too_large", p
                )
            if n > size - 8:
                raise AdapterFileError(f"header length {n} exceeds the file size {size}: truncated", "truncated", p)
            raw = f.read(n)
    except OSError as e:
        raise AdapterFileError(f"cannot read file ({e.strerror or e})", "missing", p) from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        _raise_sniffed(head, p)
        raise AdapterFileError("not a safetensors file (header is not valid JSON)", "not_safetensors", p) from None
    if not isinstance(header, dict):
        raise AdapterFileError("not a safetensors file (header is not a JSON object)", "not_safetensors", p)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise AdapterFileError("safetensors __metadata__ must map strings to strings", "metadata", p)
    data_len = size - 8 - n
    end_max = 0
    sizes = {**_DTYPES, **(_INT_DTYPES if allow_int else {})}
    for k, e in header.items():
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
            raise AdapterFileError(f"malformed header entry for tensor {k!r}", "header", p)
        if e["dtype"] not in sizes:
            raise AdapterFileError(f"tensor {k!r} has unsupported dtype {e['dtype']}", "dtype", p)
        shape, (a, b) = e["shape"], e["data_offsets"]
        if not all(isinstance(x, int) and x >= 0 for x in [*shape, a, b]) or b < a:
            raise AdapterFileError(f"malformed shape/offsets for tensor {k!r}", "header", p)
        numel = 1
        for x in shape:
            numel *= x
        if b - a != numel * sizes[e["dtype"]]:
            raise AdapterFileError(f"tensor {k!r}: byte range does not match shape {shape}", "header", p)
        end_max = max(end_max, b)
    if end_max > data_len:
        raise AdapterFileError(
            f"truncated: tensor data needs {end_max} bytes but the file holds {data_len}", "truncated", p
        )
    return header, meta


def read_safetensors(
    path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES, check_finite: bool = True, allow_int: bool = False
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file, after header validation; finite floats checked."""
    from safetensors import SafetensorError, safe_open

    header, meta = read_header(path, max_bytes, allow_int)
    p = str(path)
    try:
        with safe_open(p, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in header}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise AdapterFileError(f"cannot read safetensors data ({e})", "not_safetensors", p) from None
    if check_finite:
        for k, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise AdapterFileError(f"tensor {k!r} contains NaN or inf values", "non_finite", p)
    return tensors, meta


def write_safetensors(path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Atomically write tensors (made contiguous, detached, on CPU) with string metadata."""
    from safetensors.torch import save

    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata values must be strings: {bad}")
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write_bytes(path, save(clean, metadata=metadata))


__all__ = [
    "MAX_FILE_BYTES",
    "MAX_HEADER_BYTES",
    "read_header",
    "read_safetensors",
    "write_safetensors",
]
