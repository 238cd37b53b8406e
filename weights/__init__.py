"""difflora weights: adapter specs and math, merge/restore into live models, file formats, tokens.

Small functional API; submodules are imported on first use so ``import weights`` stays light.
"""

from __future__ import annotations

from .lazy import lazy_exports

_EXPORTS = {  # public name -> submodule
    "Adapter": "adapter",
    "AdapterError": "errors",
    "AdapterFileError": "errors",
    "AdapterMismatchError": "errors",
    "AdapterSpec": "spec",
    "IdentityBasis": "basis",
    "ApplyState": "apply",
    "ConversionReport": "convert",
    "LayerInfo": "spec",
    "NonFiniteWeightsError": "errors",
    "PerSampleLoRA": "per_sample",
    "StaleStateError": "errors",
    "TokenLayout": "tokens",
    "TokenStats": "tokens",
    "adapter_to_tokens": "tokens",
    "apply_adapter": "apply",
    "basis_per_sample": "basis",
    "basis_to_lora": "basis",
    "batch_rows": "per_sample",
    "canonicalize_lora": "convert",
    "detect_format": "io",
    "load_adapter": "io",
    "load_any": "io",
    "load_basis": "basis",
    "per_sample_adapters": "per_sample",
    "restore": "apply",
    "save_adapter": "io",
    "save_basis": "basis",
    "split_template": "tokens",
    "stack_adapters": "per_sample",
    "to_diffusers": "formats.diffusers",
    "to_kohya": "formats.kohya",
    "to_lora": "convert",
    "tokens_to_adapter": "tokens",
    "validate_adapter": "io",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
