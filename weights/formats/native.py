"""Native format: any method's own tensors (``"<layer>::<pname>"``, ``"shared::<group>::<pname>"``) with the
AdapterSpec JSON in the safetensors ``__metadata__`` (lossless for every method)."""

from __future__ import annotations

import os

from ..adapter import Adapter
from ..errors import AdapterFileError
from ..safetensors_io import read_safetensors, write_safetensors
from ..spec import AdapterSpec
from .metadata import ExportInfo, training_metadata

FORMAT_KEY = "difflora.format"  # metadata key naming the format ("native")
SPEC_KEY = "difflora.spec"  # metadata key holding AdapterSpec.to_json()
VERSION_KEY = "difflora.version"  # file format version
VERSION = "1"


def native_metadata(adapter: Adapter, info: ExportInfo | None = None) -> dict[str, str]:
    """The native keys, plus the ``modelspec.*`` ones of ``info`` (title, trigger phrase, ...) when given."""
    meta = {"format": "pt", FORMAT_KEY: "native", SPEC_KEY: adapter.spec.to_json(), VERSION_KEY: VERSION}
    if info is not None:
        keys = training_metadata(info, rank=adapter.spec.rank, alpha=adapter.spec.scale * adapter.spec.rank)
        meta |= {k: v for k, v in keys.items() if k.startswith("modelspec.") or k in _NATIVE_SS}
    return meta


_NATIVE_SS = ("ss_tag_frequency", "ss_num_train_images", "ss_max_train_steps", "ss_seed", "ss_training_comment")


def save_native(adapter: Adapter, path: str | os.PathLike, info: ExportInfo | None = None) -> None:
    """Write the adapter losslessly (atomic); ``info`` adds how it was made and how to prompt it."""
    write_safetensors(path, adapter.tensors, native_metadata(adapter, info))


def from_native(tensors: dict, meta: dict[str, str], path: str | None = None) -> Adapter:
    if SPEC_KEY not in meta:
        raise AdapterFileError(f"metadata has no {SPEC_KEY!r} (not a native difflora adapter)", "metadata", path)
    if meta.get(VERSION_KEY, VERSION) != VERSION:
        raise AdapterFileError(f"unsupported native format version {meta.get(VERSION_KEY)!r}", "metadata", path)
    try:
        spec = AdapterSpec.from_json(meta[SPEC_KEY])
    except (ValueError, TypeError, KeyError) as e:
        raise AdapterFileError(f"invalid adapter spec in metadata ({e})", "metadata", path) from None
    return Adapter(spec, dict(tensors))


def load_native(path: str | os.PathLike) -> Adapter:
    tensors, meta = read_safetensors(path, allow_int=True)  # frozen buffers may be integer (LoLDU pivots)
    return from_native(tensors, meta, str(path))


__all__ = ["FORMAT_KEY", "SPEC_KEY", "VERSION", "from_native", "load_native", "native_metadata", "save_native"]
