"""Training-time injection: wrap targeted nn.Linear / nn.Conv2d layers so the adapter params are trainable.

``inject_adapter`` replaces every module matching ``spec.targets`` by an ``AdaptedLayer`` that keeps the
frozen base weight as its own ``weight`` / ``bias`` (so the base weights' state_dict keys stay
``<name>.weight`` / ``<name>.bias``) and the method params under ``<name>.adapter.<pname>``: trainable ones as
nn.Parameter, frozen ones (SVFit's U/Vh, LoLDU's L/U/perm, ...) as buffers, shared ones (ARC's ``D``) as one
nn.Parameter registered in every wrapper of its group. The forward is the method's ``forward`` (fast
low-rank paths for LoRA/DoRA/SVFit/LoLDU/HTA/ARC, merged weight otherwise).
``extract_adapter`` reads an ``Adapter`` back, ``remove_adapter`` restores the original modules.
"""

from __future__ import annotations

import dataclasses
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapter import SEP, SHARED, Adapter, layer_key
from .methods import get_method, method_config
from .methods.base import AdapterMethod, MethodConfig
from .spec import AdapterSpec, LayerInfo, match_targets

# requires_grad flags of a model's parameters before inject_adapter froze them (restored by remove_adapter)
_FROZEN: weakref.WeakKeyDictionary[nn.Module, dict[int, bool]] = weakref.WeakKeyDictionary()


class AdaptedLayer(nn.Module):
    """A frozen nn.Linear / nn.Conv2d plus one adapter method's params."""

    def __init__(
        self,
        base: nn.Linear | nn.Conv2d,
        spec: AdapterSpec,
        method: AdapterMethod,
        cfg: MethodConfig,
        params: dict[str, Tensor],
        shared: dict[str, nn.Parameter] | None = None,
        shared_group: str | None = None,
    ) -> None:
        super().__init__()
        self.weight = base.weight  # same Parameter object: keys and storage unchanged
        self.bias = base.bias
        object.__setattr__(self, "base_layer", base)  # not a submodule: keeps the state_dict keys
        self.spec, self.method, self.cfg, self.shared_group = spec, method, cfg, shared_group
        self.enabled = True  # False: plain base layer
        self.adapter = nn.Module()
        for k, t in params.items():
            if k in method.trainable:
                self.adapter.register_parameter(k, nn.Parameter(t))
            else:
                self.adapter.register_buffer(k, t)
        self.shared_names = tuple(shared or {})  # params owned by the shared group, not by this layer
        for k, prm in (shared or {}).items():
            self.adapter.register_parameter(k, prm)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # in_features, kernel_size, ... of the wrapped layer
            base = self.__dict__.get("base_layer")
            if base is None:
                raise
            return getattr(base, name)

    def params(self) -> dict[str, Tensor]:
        """The method's params dict (per-layer trainable + frozen + shared)."""
        return {
            **dict(self.adapter.named_parameters(recurse=False)),
            **dict(self.adapter.named_buffers(recurse=False)),
        }

    def _op(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        if isinstance(self.base_layer, nn.Conv2d):
            return self.base_layer._conv_forward(x, w, b)
        return F.linear(x, w, b)

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return self._op(x, self.weight, self.bias)
        return self.method.forward(x, self.weight, self.bias, self.params(), self.cfg, self._op)

    def extra_repr(self) -> str:
        return f"method={self.method.name}, shape={tuple(self.weight.shape)}, base={type(self.base_layer).__name__}"


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLayer]:
    """Module path -> AdaptedLayer, in module order."""
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, AdaptedLayer)}


def find_targets(model: nn.Module, spec: AdapterSpec) -> dict[str, nn.Linear | nn.Conv2d]:
    """Modules matching ``spec.targets``; TypeError for a match that is not nn.Linear / nn.Conv2d."""
    found: dict[str, nn.Linear | nn.Conv2d] = {}
    inside = tuple(n + "." for n in adapted_layers(model))  # the wrappers' own submodules are never targets
    for name, mod in model.named_modules():
        if not name or not match_targets(name, spec.targets) or name.startswith(inside):
            continue
        if isinstance(mod, AdaptedLayer):
            raise ValueError(f"module {name!r} already holds an adapter; call remove_adapter first")
        if not isinstance(mod, nn.Linear | nn.Conv2d):
            raise TypeError(
                f"target {name!r} matched a {type(mod).__name__}; only nn.Linear / nn.Conv2d can be adapted"
            )
        if isinstance(mod, nn.Conv2d) and mod.groups != 1:
            raise ValueError(f"target {name!r}: grouped Conv2d (groups={mod.groups}) is not supported")
        found[name] = mod
    if not found:
        raise ValueError(f"no module of the model matches the targets {spec.targets}")
    return found


def inject_adapter(
    model: nn.Module,
    spec: AdapterSpec,
    *,
    adapter: Adapter | None = None,
    generator: torch.Generator | None = None,
    freeze_base: bool = True,
    dtype: torch.dtype = torch.float32,
) -> AdapterSpec:
    """Wrap the targeted layers of ``model`` in place; returns the spec with ``layers`` filled in.

    Args:
        model: any nn.Module (e.g. a diffusers UNet2DConditionModel).
        spec: method, rank, params and target patterns; if ``spec.layers`` is non-empty it must equal the
            matched layers (names and shapes), else ValueError.
        adapter: start from these tensors instead of the method's init (e.g. resume training).
        generator: RNG for the method's random init (seeded => reproducible).
        freeze_base: set requires_grad=False on every parameter of the model first (restored by remove).
        dtype: dtype of the floating adapter tensors (integer tensors such as LoLDU's ``perm`` stay int64).
    """
    method, cfg = get_method(spec.method), method_config(spec)
    found = find_targets(model, spec)
    layers = _checked_layers(found, spec, method, cfg, adapter)
    spec = dataclasses.replace(spec, layers=layers)

    def prep(t: Tensor, device: torch.device) -> Tensor:
        t = t.detach().to(device)
        return t.to(dtype).clone() if t.is_floating_point() else t.clone()

    shared: dict[str, dict[str, nn.Parameter]] = {}
    wrappers: dict[str, AdaptedLayer] = {}
    for lay in layers:
        mod = found[lay.name]
        W, dev = mod.weight, mod.weight.device
        group = method.shared_key(lay.shape, cfg)
        if group is not None and group not in shared:
            init = (
                adapter.shared_params(group) if adapter is not None else method.init_shared(lay.shape, cfg, generator)
            )
            if adapter is not None and not init:
                raise ValueError(f"adapter has no shared tensors for group {group!r}")
            shared[group] = {
                k: nn.Parameter(prep(t, dev), requires_grad=k in method.shared_trainable()) for k, t in init.items()
            }
        p = _initial_params(lay.name, W, method, cfg, adapter, generator)
        params = {k: prep(t, dev) for k, t in p.items()}
        wrappers[lay.name] = AdaptedLayer(mod, spec, method, cfg, params, shared.get(group), group)
    # all wrappers built without error: only now touch the model
    if freeze_base:
        _FROZEN.setdefault(model, {id(p): p.requires_grad for p in model.parameters()})
        model.requires_grad_(False)
    for name, wrapper in wrappers.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, wrapper)
    return spec


def _checked_layers(found: dict[str, nn.Module], spec: AdapterSpec, method, cfg, adapter: Adapter | None) -> list:
    """The targeted layers' infos, checked against ``spec.layers`` (when given), the adapter's method and the
    method's shape rules."""
    layers = [
        LayerInfo(n, tuple(m.weight.shape), "conv" if isinstance(m, nn.Conv2d) else "linear") for n, m in found.items()
    ]
    if spec.layers and [(x.name, tuple(x.shape)) for x in spec.layers] != [(x.name, x.shape) for x in layers]:
        raise ValueError(f"spec.layers ({len(spec.layers)}) do not match the model's targeted layers ({len(layers)})")
    if adapter is not None and adapter.spec.method != spec.method:
        raise ValueError(f"adapter method {adapter.spec.method!r} differs from spec method {spec.method!r}")
    for lay in layers:
        method.check_shape(lay.shape, cfg)
    return layers


def _initial_params(
    name: str, W: Tensor, method, cfg, adapter: Adapter | None, generator: torch.Generator | None
) -> dict[str, Tensor]:
    """One layer's starting tensors: the adapter's (frozen buffers rebuilt from W where it lacks them, e.g. a
    predicted adapter's SVFit U/Vh), else the method's init."""
    if adapter is None:
        return method.init_layer(W.detach(), cfg, generator)
    p = adapter.layer_params(name)
    missing = [k for k in method.trainable if k not in p]
    if missing:
        raise ValueError(f"adapter lacks trainable tensors {missing} for layer {name!r}")
    if any(k not in p for k in method.frozen):  # e.g. a predicted adapter: rebuild U/Vh, L/U/perm from W
        p = {**method.init_layer(W.detach(), cfg, generator), **p}
    return p


def extract_adapter(model: nn.Module) -> Adapter:
    """The injected adapter as detached cpu tensors (per-layer ``<layer>::<pname>``, ``shared::<group>::<pname>``)."""
    wrappers = adapted_layers(model)
    if not wrappers:
        raise ValueError("the model holds no injected adapter")
    spec = next(iter(wrappers.values())).spec
    tensors: dict[str, Tensor] = {}
    for name, w in wrappers.items():
        for k, t in w.params().items():
            key = f"{SHARED}{SEP}{w.shared_group}{SEP}{k}" if k in w.shared_names else layer_key(name, k)
            tensors[key] = t.detach().cpu().clone()
    return Adapter(spec, tensors)


def remove_adapter(model: nn.Module) -> Adapter:
    """Unwrap every AdaptedLayer (restoring the original module objects); returns the extracted adapter."""
    adapter = extract_adapter(model)
    for name, w in adapted_layers(model).items():
        base = w.base_layer
        base.weight = w.weight
        if base.bias is not None or w.bias is not None:
            base.bias = w.bias
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, base)
    flags = _FROZEN.pop(model, None)
    if flags is not None:
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), p.requires_grad))
    return adapter


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters that require grad (shared ones once), for the optimiser."""
    seen: dict[int, nn.Parameter] = {}
    for w in adapted_layers(model).values():
        for prm in w.adapter.parameters(recurse=False):
            if prm.requires_grad:
                seen.setdefault(id(prm), prm)
    return list(seen.values())


def set_adapter_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every AdaptedLayer between adapted and plain base forward."""
    for w in adapted_layers(model).values():
        w.enabled = enabled


__all__ = sorted(
    [
        "AdaptedLayer",
        "adapted_layers",
        "extract_adapter",
        "find_targets",
        "inject_adapter",
        "remove_adapter",
        "set_adapter_enabled",
        "trainable_parameters",
    ]
)
