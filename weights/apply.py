"""Merge an adapter into a live model and restore the exact original weights (the service's hot path).

``apply_adapter(model, adapter, scale)`` writes ``W' = W₀ + scale·ΔW(W₀, params)`` into each targeted
module's weight **in place** (same storage, so compiled graphs, hooks and optimiser references stay valid) and
returns an :class:`ApplyState`. ``restore(model, state)`` copies the original tensors back — never subtracts —
so fp32/fp16/bf16 weights come back bit-identical after any number of swaps.

Per model a small cache (weakly keyed by the module) holds: ``name → module`` resolved once, and a copy of the
original weight/bias of every layer ever targeted (taken on first touch, re-taken if the weight was replaced or
modified outside this module while not applied). Applying adapter B while A is applied goes straight from A to
B: every merged weight is computed from the cached original, and layers of A that B does not target are
restored. ΔW is computed in fp32 on the weight's device; LoRA uses one fused ``addmm`` per layer.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .adapter import SEP, SHARED, Adapter
from .errors import AdapterMismatchError, NonFiniteWeightsError, StaleStateError

_COUNTER = itertools.count(1)


@dataclass(frozen=True, eq=False)
class ApplyState:
    """Handle of one application; pass it to :func:`restore`."""

    method: str  # adapter method
    spec_hash: str  # AdapterSpec.hash() of the applied adapter
    scale: float  # user scale λ
    layers: tuple[str, ...]  # modified module paths
    token: int = field(default_factory=lambda: next(_COUNTER))  # identity of this application


@dataclass
class _Original:
    weight: Tensor  # the original weight: a private copy (in-place mode) or the model's own tensor (swap mode)
    bias: Tensor | None  # copy of the original bias (only once a method moved the bias)
    ptr: int  # in-place mode: data_ptr of the live weight storage the copy belongs to
    version: int  # in-place mode: live weight's version counter right after our last write/restore
    buf: Tensor | None = None  # swap mode: preallocated buffer the merged weight is written to


class _ModelCache:
    def __init__(self, model: nn.Module) -> None:
        self.model_ref = weakref.ref(model)
        self.modules: dict[str, nn.Module] | None = None
        self.originals: dict[str, _Original] = {}
        self.active: ApplyState | None = None
        self.touched: set[str] = set()  # layers whose weight (and maybe bias) currently differs from original
        self.inplace = True  # mode of the originals held (see apply_adapter)
        self.lock = threading.RLock()

    def module(self, name: str) -> nn.Module:
        if self.modules is None:
            self.modules = dict(self.model_ref().named_modules())
        mod = self.modules.get(name)
        if mod is None:
            raise AdapterMismatchError(
                f"layer {name!r} of the adapter does not exist in the model (wrong base model?)"
            )
        return mod


_CACHES: weakref.WeakKeyDictionary[nn.Module, _ModelCache] = weakref.WeakKeyDictionary()
_CACHES_LOCK = threading.Lock()


def _cache(model: nn.Module) -> _ModelCache:
    c = _CACHES.get(model)
    if c is None:
        with _CACHES_LOCK:
            c = _CACHES.get(model)
            if c is None:
                c = _CACHES[model] = _ModelCache(model)
    return c


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape and a.device == b.device


def _original(cache: _ModelCache, name: str, w: Tensor) -> _Original:
    """The original of a layer's weight ``w`` (the live tensor), re-taken when it changed behind our back."""
    o = cache.originals.get(name)
    applied_here = name in cache.touched
    if cache.inplace:
        if o is not None and (o.ptr != w.data_ptr() or o.weight.dtype != w.dtype or o.weight.shape != w.shape):
            if applied_here and o.weight.shape == w.shape:  # replaced while merged (model.half()): follow the cast
                o = cache.originals[name] = _Original(o.weight.to(w.device, w.dtype), o.bias, w.data_ptr(), w._version)
                return o
            o = None  # replaced while not applied (model.to(...), load_state_dict(assign=True), ...)
        elif o is not None and not applied_here and o.version != w._version:
            o = None  # modified in place while not applied: the current weight is the new original
        if o is None:
            o = cache.originals[name] = _Original(w.clone(), None, w.data_ptr(), w._version)
        return o
    # swap mode: the original is the model's own tensor, the merged weight lives in o.buf
    if o is not None:
        if applied_here and not (o.buf is not None and _same_tensor(w, o.buf)):
            if o.weight.shape != w.shape:
                o = None
            else:  # replaced while merged: the original follows the new dtype/device
                o.weight, o.buf = o.weight.to(w.device, w.dtype), None
        elif not applied_here and not _same_tensor(w, o.weight):
            o = None  # replaced while not applied: the live tensor is the new original
    if o is None:
        o = cache.originals[name] = _Original(w, None, w.data_ptr(), w._version)
    return o


def _group_params(adapter: Adapter) -> tuple[dict[str, dict[str, Tensor]], dict[str, dict[str, Tensor]]]:
    """One pass over the tensor keys: ``layer -> {pname: t}`` and ``group -> {pname: t}``."""
    layers: dict[str, dict[str, Tensor]] = {}
    shared: dict[str, dict[str, Tensor]] = {}
    for key, t in adapter.tensors.items():
        head, _, pname = key.rpartition(SEP)
        if head.startswith(SHARED + SEP):
            shared.setdefault(head[len(SHARED) + len(SEP) :], {})[pname] = t
        else:
            layers.setdefault(head, {})[pname] = t
    return layers, shared


def _restore_layer(cache: _ModelCache, name: str) -> None:
    mod = cache.module(name)
    o = cache.originals[name]
    if cache.inplace:
        w = mod.weight.detach()
        w.copy_(o.weight)
        o.version = w._version
    else:
        mod.weight.data = o.weight  # swap the original tensor back: no copy
    _restore_bias(mod, o)


def _restore_bias(mod: nn.Module, o: _Original) -> None:
    """Put back a bias an adapter moved, and forget the copy: the next application takes the bias as it is then
    (it may have been changed while no adapter was applied, like the weight)."""
    if o.bias is not None and mod.bias is not None:
        mod.bias.detach().copy_(o.bias)
    o.bias = None


def _restore_all(cache: _ModelCache) -> None:
    for name in list(cache.touched):
        _restore_layer(cache, name)
    cache.touched.clear()
    cache.active = None


@torch.no_grad()
def apply_adapter(
    model: nn.Module, adapter: Adapter, scale: float = 1.0, *, safe: bool = False, inplace: bool = True
) -> ApplyState:
    """Merge ``adapter`` into ``model``: W ← W₀ + scale·ΔW(W₀) for every targeted layer.

    Replaces whatever adapter is currently applied (its extra layers are restored). ``inplace=True`` writes
    into the weights' own storage and keeps a copy of the originals (storage never moves: safe with compiled
    graphs / CUDA graphs); ``inplace=False`` writes into a per-layer buffer and swaps ``weight.data`` (no copy of
    the originals, restore is a pointer swap). ``safe=True`` checks the merged weights for NaN/inf and, if any,
    restores the model and raises :class:`NonFiniteWeightsError`. Raises :class:`AdapterMismatchError` if a layer
    is missing or has another shape than the spec says.
    """
    from .methods import get_method, method_config

    spec = adapter.spec
    method = get_method(spec.method)
    cfg = method_config(spec)
    cache = _cache(model)
    layer_params, shared = _group_params(adapter)
    fast = "lora" if spec.method == "lora" else None
    if spec.method == "dora" and method.trainable == ("A", "B", "magnitude"):
        fast = "dora"
    merge = _Merge(method, cfg, float(scale), shared, fast)
    with cache.lock:
        mods = _validated_modules(cache, spec, layer_params, check_lora=fast is not None)  # before any write
        if cache.inplace != inplace:  # mode switch: back to the originals, then forget them
            _restore_all(cache)
            cache.originals.clear()
            cache.inplace = inplace
        _restore_untargeted(cache, {lay.name for lay in spec.layers})
        cache.active = None
        checks: list[Tensor] = []
        try:
            for lay, mod in zip(spec.layers, mods):
                w = _merge_layer(cache, lay, mod, layer_params[lay.name], merge, inplace)
                if safe:
                    checks.append(torch.isfinite(w).all())
        except (AdapterMismatchError, StaleStateError):
            _restore_all(cache)
            raise
        except (RuntimeError, KeyError, IndexError) as e:
            _restore_all(cache)
            raise AdapterMismatchError(
                f"layer {lay.name!r}: adapter tensors do not fit ({type(e).__name__}: {e})"
            ) from None
        if checks and not bool(torch.stack(checks).all()):
            bad = [lay.name for lay, mod in zip(spec.layers, mods) if not torch.isfinite(mod.weight).all()]
            _restore_all(cache)
            raise NonFiniteWeightsError(
                f"merging gives non-finite weights in {len(bad)} layer(s), e.g. {bad[0]!r}; model restored"
            )
        state = ApplyState(spec.method, spec.hash(), float(scale), tuple(lay.name for lay in spec.layers))
        cache.active = state
        return state


def _validated_modules(
    cache: _ModelCache, spec, layer_params: dict[str, dict[str, Tensor]], check_lora: bool
) -> list[nn.Module]:
    """The module of every layer of ``spec``, after checking that each has a weight of the spec's shape and that
    the adapter has its tensors (LoRA/DoRA factors' shapes too): nothing is written unless everything fits."""
    mods = []
    for lay in spec.layers:
        mod = cache.module(lay.name)
        w = getattr(mod, "weight", None)
        if not isinstance(w, Tensor):
            raise AdapterMismatchError(f"module {lay.name!r} has no weight tensor")
        if tuple(w.shape) != tuple(lay.shape):
            raise AdapterMismatchError(
                f"layer {lay.name!r}: model weight has shape {tuple(w.shape)}, adapter expects {tuple(lay.shape)}"
                " (adapter made for another base model?)"
            )
        if lay.name not in layer_params:
            raise AdapterMismatchError(f"adapter has no tensors for its layer {lay.name!r}")
        if check_lora:
            _check_lora(lay.name, layer_params[lay.name], w)
        mods.append(mod)
    return mods


def _restore_untargeted(cache: _ModelCache, names: set[str]) -> None:
    """Layers of the previous adapter that the new one does not target go back to the original."""
    for name in [n for n in cache.touched if n not in names]:
        _restore_layer(cache, name)
        cache.touched.discard(name)


@dataclass(frozen=True)
class _Merge:
    """What merging one adapter needs at every layer."""

    method: Any  # the adapter's method module (weights.methods)
    cfg: Any  # its MethodConfig
    scale: float  # user scale λ
    shared: dict[str, dict[str, Tensor]]  # shared tensors by group key (ARC)
    fast: str | None  # "lora" / "dora": the fused paths; None: ΔW from the method


def _merge_layer(cache: _ModelCache, lay, mod: nn.Module, p: dict[str, Tensor], m: _Merge, inplace: bool) -> Tensor:
    """Write one layer's merged weight into the live weight (or, not ``inplace``, into the layer's buffer, then
    swapped in) from the cached original; the bias follows. Returns the merged weight."""
    live = mod.weight.detach()
    o = _original(cache, lay.name, live)
    if inplace:
        w = live
    else:
        if o.buf is None or not (o.buf.shape == live.shape and o.buf.dtype == live.dtype):
            o.buf = torch.empty_like(o.weight)
        w = o.buf
    cache.touched.add(lay.name)
    if m.fast == "lora":
        _merge_lora(w, o.weight, p, m.scale * m.cfg.scale)
        moved_bias = False
    elif m.fast == "dora":
        _merge_dora(w, o.weight, p, m.cfg.scale, m.scale)
        moved_bias = False
    else:
        moved_bias = _merge_delta(w, o, lay, mod, p, m)
    if not moved_bias:
        _restore_bias(mod, o)  # a previous adapter (ARC) moved this layer's bias
    if inplace:
        o.version = w._version
    elif not _same_tensor(live, w):
        mod.weight.data = w
    return w


def _merge_delta(w: Tensor, o: _Original, lay, mod: nn.Module, p: dict[str, Tensor], m: _Merge) -> bool:
    """Any method: ``w = W₀ + λ·ΔW(W₀, p)`` computed in fp32 (and the bias delta where the method has one).
    Returns whether the bias was moved."""
    method, cfg, scale, shared = m.method, m.cfg, m.scale, m.shared
    key = method.shared_key(lay.shape, cfg)
    if key is not None:
        p = {**p, **shared.get(key, {})}
    p = {k: v.to(device=w.device, non_blocking=True) for k, v in p.items()}
    Wf = o.weight.float()  # (m, n[, kh, kw]) fp32 (no copy for fp32 weights)
    dW = method.delta(Wf, p, cfg)  # fp32, like W
    if w.dtype == torch.float32:
        torch.add(Wf, dW, alpha=scale, out=w)
    else:
        w.copy_(torch.add(Wf, dW, alpha=scale))
    if method.has_bias_delta:
        db = method.bias_delta(Wf, p, cfg)  # (m,) or None
        if db is not None:
            _merge_bias(lay.name, mod, o, db, scale)
            return True
    return False


def _check_lora(name: str, p: dict[str, Tensor], w: Tensor) -> None:
    A, B = p.get("A"), p.get("B")
    if A is None or B is None:
        raise AdapterMismatchError(f"layer {name!r}: LoRA needs tensors A and B, got {sorted(p)}")
    m, n_flat = w.shape[0], w[0].numel()
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1] or A.shape[1] != n_flat or B.shape[0] != m:
        raise AdapterMismatchError(
            f"layer {name!r}: LoRA A {tuple(A.shape)} / B {tuple(B.shape)} do not fit weight {tuple(w.shape)}"
        )


def _merge_lora(w: Tensor, W0: Tensor, p: dict[str, Tensor], alpha: float) -> None:
    """w ← W0 + alpha·B A in one addmm (fp32), or added in fp32 and rounded once (fp16/bf16)."""
    A = p["A"].to(device=w.device, dtype=torch.float32)  # (r, n_flat)
    B = p["B"].to(device=w.device, dtype=torch.float32)  # (m, r)
    m = w.shape[0]
    if w.dtype == torch.float32:
        torch.addmm(W0.view(m, -1), B, A, alpha=alpha, out=w.view(m, -1))
    else:
        w.view(m, -1).copy_(torch.addmm(W0.view(m, -1).float(), B, A, alpha=alpha))


def _merge_dora(w: Tensor, W0: Tensor, p: dict[str, Tensor], s: float, scale: float) -> None:
    """DoRA (weights.methods.dora): W' = g ⊙ (W0 + s·BA), g = μ / ‖W0 + s·BA‖_row; at user scale λ:
    W0 + λ(W' − W0) = λg ⊙ V + (1 − λ) W0. Written straight into w for fp32 weights (no temporaries)."""
    A = p["A"].to(device=w.device, dtype=torch.float32)  # (r, n_flat)
    B = p["B"].to(device=w.device, dtype=torch.float32)  # (m, r)
    mag = p["magnitude"].to(device=w.device, dtype=torch.float32).reshape(-1, 1)  # (m, 1)
    m = w.shape[0]
    fp32 = w.dtype == torch.float32
    W0m = W0.view(m, -1)  # (m, n_flat)
    V = torch.addmm(W0m.float(), B, A, alpha=s, out=w.view(m, -1) if fp32 else None)  # W0 + s·BA
    g = mag / torch.linalg.vector_norm(V, dim=1, keepdim=True)  # (m, 1)
    if scale == 1.0:
        V.mul_(g)
    else:
        V.mul_(scale * g).add_(W0m.float(), alpha=1.0 - scale)
    if not fp32:
        w.view(m, -1).copy_(V)


def _merge_bias(name: str, mod: nn.Module, o: _Original, db: Tensor, scale: float) -> None:
    if mod.bias is None:
        if bool((db != 0).any()):
            raise AdapterMismatchError(f"layer {name!r} has no bias but the adapter moves it (bias delta)")
        return
    b = mod.bias.detach()
    if o.bias is None:
        o.bias = b.clone()
    b.copy_(o.bias.float() + scale * db.to(device=b.device, dtype=torch.float32))


@torch.no_grad()
def restore(model: nn.Module, state: ApplyState | None = None) -> None:
    """Put back the original weights (bit-identical copies). ``state=None`` restores whatever is applied.

    Raises :class:`StaleStateError` if ``state`` is not the application currently on the model.
    """
    cache = _CACHES.get(model)
    if cache is None:
        if state is not None:
            raise StaleStateError("nothing was applied to this model")
        return
    with cache.lock:
        if state is not None and (cache.active is None or cache.active.token != state.token):
            raise StaleStateError(
                "this adapter state is no longer applied to the model (another adapter replaced it or it was restored)"
            )
        _restore_all(cache)


def applied(model: nn.Module) -> ApplyState | None:
    """The state currently applied to ``model`` (None if it holds its original weights)."""
    cache = _CACHES.get(model)
    return None if cache is None else cache.active


def release(model: nn.Module) -> None:
    """Restore the model and drop its cached originals and module map (frees the copies)."""
    restore(model)
    with _CACHES_LOCK:
        _CACHES.pop(model, None)


__all__ = ["ApplyState", "applied", "apply_adapter", "release", "restore"]
