"""Identity basis: every identity's adapter is a point ``c ∈ R^K`` of one space shared by all identities.

Per targeted layer the basis holds a down-projection ``A`` (r, n_flat) shared by every identity and K
up-projection directions ``B_k`` (K, m, r). Identity c's adapter is the ordinary rank-r LoRA

    ΔW(c) = s · B(c) A,    B(c) = Σ_k c_k B_k    (s = alpha / r of the basis' spec)

so it exports exactly (no SVD) to every LoRA format the project writes (diffusers, kohya, peft, native) through
:func:`basis_to_lora`, and a batch of identities runs in one forward through :func:`basis_per_sample`
(:mod:`weights.per_sample`: one shared A, per-row B(c_i)). Conv2d layers use the LoRA/kohya layout: A is a
(r, n, kh, kw) conv flattened to (r, n·kh·kw), B a 1x1 conv.

File (safetensors, written atomically): ``"<layer>::A"`` (r, n_flat) and ``"<layer>::B"`` (K, m, r) for each layer
of the spec, metadata ``difflora.format = "basis"``, ``difflora.basis`` = JSON ``{"version", "K", "rank", "spec"}``
and ``difflora.basis_meta`` = JSON of free-form string metadata (training config, identities, ...).

    basis = init_basis(unet, FULL_TARGETS, K=32, rank=4, generator=torch.Generator().manual_seed(0))
    save_basis(basis, "basis.safetensors")
    adapter = basis_to_lora(load_basis("basis.safetensors"), code)  # a method-"lora" Adapter: apply, export...
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .adapter import Adapter, layer_key
from .errors import AdapterFileError
from .formats.native import FORMAT_KEY
from .per_sample import PerSampleLoRA
from .spec import AdapterSpec, LayerInfo

FORMAT = "basis"  # value of the FORMAT_KEY metadata (native adapters: "native")
BASIS_KEY = "difflora.basis"  # metadata key: JSON {"version", "K", "rank", "spec"}
META_KEY = "difflora.basis_meta"  # metadata key: JSON object of free-form strings
VERSION = 1


@dataclass
class IdentityBasis:
    """A shared down-projection and K up-projection directions per layer (see the module docstring)."""

    spec: AdapterSpec  # the LoRA spec of every identity's adapter (method "lora", rank r, targets, layers, alpha)
    down: dict[str, Tensor]  # layer -> A (r, n_flat), shared by every identity
    up: dict[str, Tensor]  # layer -> B_k stack (K, m, r)
    metadata: dict[str, str] = field(default_factory=dict)  # free-form (training config, identity names, ...)

    def __post_init__(self) -> None:
        if self.spec.method != "lora":
            raise ValueError(f"an identity basis spans LoRA adapters; spec method is {self.spec.method!r}")
        names = [lay.name for lay in self.spec.layers]
        if not names:
            raise ValueError("an identity basis needs at least one layer")
        if set(names) != set(self.down) or set(names) != set(self.up):
            raise ValueError("basis tensors must cover exactly the layers of its spec")
        ks = {int(self.up[n].shape[0]) for n in names}
        if len(ks) != 1:
            raise ValueError(f"every layer must have the same number K of directions, got {sorted(ks)}")
        r = self.spec.rank
        for lay in self.spec.layers:
            m, n_flat = lay.shape[0], int(torch.Size(lay.shape[1:]).numel())
            A, B = self.down[lay.name], self.up[lay.name]
            if tuple(A.shape) != (r, n_flat) or B.dim() != 3 or tuple(B.shape[1:]) != (m, r):
                raise ValueError(
                    f"layer {lay.name!r} of shape {tuple(lay.shape)}: A {tuple(A.shape)} / B {tuple(B.shape)}, "
                    f"expected ({r}, {n_flat}) / (K, {m}, {r})"
                )

    @property
    def num_directions(self) -> int:
        """K, the dimension of the identity space."""
        return int(next(iter(self.up.values())).shape[0])

    @property
    def rank(self) -> int:
        return self.spec.rank

    def num_params(self) -> int:
        return sum(t.numel() for t in self.down.values()) + sum(t.numel() for t in self.up.values())

    def fingerprint(self) -> str:
        """Stable hash of the spec and every tensor's values (16 hex digits)."""
        h = hashlib.sha256(self.spec.to_json().encode())
        for name in sorted(self.down):
            for t in (self.down[name], self.up[name]):
                h.update(name.encode())
                h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


# ---- pure tensor functions -------------------------------------------------------------------------------------


def basis_up(up: Tensor, codes: Tensor) -> Tensor:
    """B(c) = Σ_k c_k B_k: up (K, m, r), codes (..., K) -> (..., m, r)."""
    return torch.einsum("...k,kmr->...mr", codes.to(up.dtype), up)


def init_down(n_flat: int, rank: int, generator: torch.Generator | None) -> Tensor:
    """A ~ N(0, 1/n_flat): (r, n_flat), a Gaussian scaled by the fan-in (sampled on the CPU generator)."""
    return torch.randn(rank, n_flat, generator=generator) / n_flat**0.5


def init_basis(
    model: nn.Module,
    targets: list[str],
    num_directions: int,
    rank: int,
    *,
    generator: torch.Generator | None = None,
    alpha: float | None = None,
    base_model: str = "",
) -> IdentityBasis:
    """A fresh basis for ``model``'s layers matching ``targets``: A ~ N(0, 1/fan-in), every B_k = 0 (so ΔW(c) = 0)."""
    from .inject import find_targets

    if num_directions < 1:
        raise ValueError(f"the basis needs K >= 1 directions, got {num_directions}")
    spec = AdapterSpec(method="lora", rank=rank, alpha=alpha, targets=list(targets), base_model=base_model)
    found = find_targets(model, spec)
    layers = [
        LayerInfo(n, tuple(m.weight.shape), "conv" if isinstance(m, nn.Conv2d) else "linear") for n, m in found.items()
    ]
    spec = dataclasses.replace(spec, layers=layers)
    down, up = {}, {}
    for lay in layers:
        m, n_flat = lay.shape[0], int(torch.Size(lay.shape[1:]).numel())
        down[lay.name] = init_down(n_flat, rank, generator)  # (r, n_flat)
        up[lay.name] = torch.zeros(num_directions, m, rank)  # (K, m, r)
    return IdentityBasis(spec, down, up)


def basis_to_lora(basis: IdentityBasis, code: Tensor) -> Adapter:
    """Identity ``code`` (K,) as an ordinary LoRA Adapter (method "lora", the basis' spec): A shared, B = B(c).

    Exact: ``apply_adapter`` / ``save_adapter(format=diffusers|kohya|peft)`` of it carry ΔW(c) with no SVD.
    """
    c = torch.as_tensor(code).reshape(-1)
    if c.numel() != basis.num_directions:
        raise ValueError(f"code has {c.numel()} values, the basis has K = {basis.num_directions} directions")
    tensors: dict[str, Tensor] = {}
    for lay in basis.spec.layers:
        tensors[layer_key(lay.name, "A")] = basis.down[lay.name].detach().clone()  # (r, n_flat)
        tensors[layer_key(lay.name, "B")] = basis_up(basis.up[lay.name].detach(), c.detach()).contiguous()  # (m, r)
    return Adapter(dataclasses.replace(basis.spec), tensors)


def per_sample_factors(
    down: dict[str, Tensor], up: dict[str, Tensor], codes: Tensor, scale: float | Tensor
) -> PerSampleLoRA:
    """Per-sample factors of S identities (autograd kept): down layer -> A (r, n_flat) shared, up layer -> B_k
    (K, m, r), codes (S, K), ``scale`` the full per-identity factor (float or (S,)). Result: shared A (r, n_flat),
    per-row B(c_i) (S, m, r)."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be (S, K), got shape {tuple(codes.shape)}")
    ups = {name: basis_up(u, codes) for name, u in up.items()}  # (S, m, r)
    s = torch.as_tensor(scale, dtype=codes.dtype, device=codes.device)
    s = s.expand(codes.shape[0]) if s.dim() == 0 else s
    return PerSampleLoRA(dict(down), ups, s)


def basis_per_sample(basis: IdentityBasis, codes: Tensor, scale: float | Tensor = 1.0) -> PerSampleLoRA:
    """S identities' adapters for :func:`weights.per_sample.per_sample_adapters`: codes (S, K), ``scale`` the user's
    λ (float or (S,)); the basis' LoRA scale alpha / r is applied. Row i equals merging ``basis_to_lora(basis,
    codes[i])`` at scale λ_i."""
    return per_sample_factors(basis.down, basis.up, codes, basis.spec.scale * torch.as_tensor(scale))


# ---- file format ----------------------------------------------------------------------------------------------


def save_basis(basis: IdentityBasis, path: str | os.PathLike) -> None:
    """Write the basis atomically (safetensors, see the module docstring)."""
    from .safetensors_io import write_safetensors

    tensors = {}
    for lay in basis.spec.layers:
        tensors[layer_key(lay.name, "A")] = basis.down[lay.name]
        tensors[layer_key(lay.name, "B")] = basis.up[lay.name]
    header = {"version": VERSION, "K": basis.num_directions, "rank": basis.rank, "spec": basis.spec.to_dict()}
    meta = {
        "format": "pt",
        FORMAT_KEY: FORMAT,
        BASIS_KEY: json.dumps(header, sort_keys=True),
        META_KEY: json.dumps(basis.metadata, sort_keys=True),
    }
    write_safetensors(path, tensors, meta)


def load_basis(path: str | os.PathLike) -> IdentityBasis:
    """Read a basis file; :class:`AdapterFileError` naming the problem for anything else."""
    from .adapter import split_key
    from .safetensors_io import read_safetensors

    p = str(path)
    if not os.path.isfile(p):
        raise AdapterFileError("no such basis file", "missing", p)
    tensors, meta = read_safetensors(p)
    if meta.get(FORMAT_KEY) != FORMAT or BASIS_KEY not in meta:
        raise AdapterFileError(f"not an identity basis file (no {FORMAT_KEY}={FORMAT!r} metadata)", "format", p)
    try:
        header = json.loads(meta[BASIS_KEY])
        extra = json.loads(meta.get(META_KEY, "{}"))
        spec = AdapterSpec.from_dict(header["spec"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise AdapterFileError(f"invalid basis metadata ({e})", "metadata", p) from None
    if header.get("version") != VERSION:
        raise AdapterFileError(f"unsupported basis format version {header.get('version')!r}", "metadata", p)
    down, up = {}, {}
    for key, t in tensors.items():
        try:
            layer, pname = split_key(key)
        except ValueError as e:
            raise AdapterFileError(str(e), "keys", p) from None
        if pname not in ("A", "B"):
            raise AdapterFileError(f"unexpected basis tensor {key!r}", "keys", p)
        (down if pname == "A" else up)[layer] = t
    try:
        basis = IdentityBasis(spec, down, up, {str(k): str(v) for k, v in extra.items()})
    except ValueError as e:
        raise AdapterFileError(str(e), "shape", p) from None
    if basis.num_directions != header.get("K") or basis.rank != header.get("rank"):
        raise AdapterFileError("basis K / rank in the metadata do not match its tensors", "shape", p)
    return basis


# ---- thin module wrapper (training) ----------------------------------------------------------------------------


class BasisModule(nn.Module):
    """The basis as trainable parameters: ``down[i]`` / ``up[i]`` for ``spec.layers[i]`` (ParameterLists).

    ``per_sample(codes)`` gives the factors of a batch of identities; ``to_basis()`` a detached IdentityBasis.
    """

    def __init__(self, basis: IdentityBasis, *, train_down: bool = True) -> None:
        super().__init__()
        self.spec = basis.spec
        self.metadata = dict(basis.metadata)
        self.names = [lay.name for lay in basis.spec.layers]
        self.down = nn.ParameterList(
            [nn.Parameter(basis.down[n].detach().float().clone(), requires_grad=train_down) for n in self.names]
        )
        self.up = nn.ParameterList([nn.Parameter(basis.up[n].detach().float().clone()) for n in self.names])

    def per_sample(self, codes: Tensor, scale: float | Tensor = 1.0) -> PerSampleLoRA:
        """codes (S, K) -> per-sample LoRA factors (shared A, B(c_i)), LoRA scale s·λ applied."""
        down = dict(zip(self.names, self.down, strict=True))
        up = dict(zip(self.names, self.up, strict=True))
        return per_sample_factors(down, up, codes, self.spec.scale * torch.as_tensor(scale))

    def to_basis(self) -> IdentityBasis:
        down = {n: p.detach().cpu().clone() for n, p in zip(self.names, self.down, strict=True)}
        up = {n: p.detach().cpu().clone() for n, p in zip(self.names, self.up, strict=True)}
        return IdentityBasis(self.spec, down, up, dict(self.metadata))


__all__ = [
    "BasisModule",
    "IdentityBasis",
    "basis_per_sample",
    "basis_to_lora",
    "basis_up",
    "init_basis",
    "init_down",
    "load_basis",
    "per_sample_factors",
    "save_basis",
]
