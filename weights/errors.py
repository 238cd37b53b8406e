"""Typed errors of the weights package (all ValueError subclasses, so callers may catch ValueError)."""

from __future__ import annotations


class AdapterError(ValueError):
    """Base class of adapter errors."""


class AdapterFileError(AdapterError):
    """An adapter file cannot be read or written: not safetensors, truncated, bad metadata, NaN/inf, too large...

    ``reason`` is a short machine-readable code (``"not_safetensors"``, ``"pickle"``, ``"truncated"``,
    ``"header"``, ``"too_large"``, ``"metadata"``, ``"unknown_method"``, ``"keys"``, ``"shape"``, ``"dtype"``,
    ``"non_finite"``, ``"format"``, ``"missing"``).
    """

    def __init__(self, message: str, reason: str = "invalid", path: str | None = None) -> None:
        self.reason = reason
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class AdapterMismatchError(AdapterError):
    """An adapter does not fit a model: a targeted layer is missing or has another shape (wrong base model)."""


class NonFiniteWeightsError(AdapterError):
    """Merging produced NaN/inf weights (raised by ``apply_adapter(..., safe=True)``; the model is restored)."""


class StaleStateError(AdapterError):
    """``restore`` was given a state that is no longer the one applied to the model."""


__all__ = sorted(
    ["AdapterError", "AdapterFileError", "AdapterMismatchError", "NonFiniteWeightsError", "StaleStateError"]
)
