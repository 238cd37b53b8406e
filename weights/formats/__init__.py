"""Adapter file formats: native (lossless), diffusers/peft state dicts, kohya-ss, peft folders."""

FORMATS = ("native", "diffusers", "kohya", "peft")  # names accepted by weights.io.save_adapter(format=...)

__all__ = ["FORMATS"]
