"""Adapter file formats: native (lossless), diffusers/peft state dicts, kohya-ss, peft folders."""

from __future__ import annotations

from ..spec import AdapterSpec

FORMATS = ("native", "diffusers", "kohya", "peft")  # names accepted by weights.io.save_adapter(format=...)
DORA_FORMATS = ("diffusers", "peft")  # formats that store DoRA as itself (LoRA factors + magnitude vector)


def keeps_dora(spec: AdapterSpec, fmt: str, rank: int | None = None) -> bool:
    """True when ``fmt`` writes this DoRA adapter as DoRA: a DoRA format, at the adapter's own rank."""
    return spec.method == "dora" and fmt in DORA_FORMATS and rank in (None, spec.rank)


def export_needs_base(spec: AdapterSpec, fmt: str, rank: int | None = None) -> bool:
    """True when writing ``spec``'s adapter as ``fmt`` (at ``rank``) needs the base model's weights: a conversion
    to LoRA of a method whose ΔW depends on W (multiplicative methods, DoRA through its row norm)."""
    from ..convert import needs_base
    from ..methods import get_method

    if fmt == "native" or keeps_dora(spec, fmt, rank):
        return False
    return needs_base(get_method(spec.method))


__all__ = ["DORA_FORMATS", "FORMATS", "export_needs_base", "keeps_dora"]
