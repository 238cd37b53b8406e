"""Strict JSON for the files this package writes (results, ``tuning.json``, ``summary.json``, ``metrics.jsonl``,
configs): a non-finite value (e.g. identity recovery 0/0 when no oracle gained anything) becomes ``null``, never a
bare ``NaN`` token that strict parsers refuse."""

from __future__ import annotations

import json
import math
from typing import Any


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
