"""Per-sample LoRA adapters in one UNet forward, without merging.

A batch of N UNet rows where each row has its own LoRA-shaped adapter (or none): at every targeted layer the
output becomes ``y_i = W x_i + b + s_i · B_i (A_i x_i)`` for row i, with the adapter ``(A_i, B_i, s_i)`` that
row i maps to. That equals merging row i's adapter alone (``W + s_i B_i A_i``) up to fp32 rounding. Conv2d
targets use the kohya/LoRA layout: ``A`` is a (r, n, kh, kw) conv with the base conv's stride, padding and
dilation, ``B`` a 1x1 conv. Nothing is written into the model: forward hooks add the low-rank terms, so the
frozen weights get no gradient while the factors do (they may require grad: training uses this).

Typical use — three prompts, three identities, classifier-free guidance::

    ps = stack_adapters([ad_a, ad_b, None])                 # S = 3 adapters (None: the base model)
    rows = batch_rows([0, 1, 2], cfg=True)                  # UNet rows [uncond 0..2, cond 0..2] -> adapters
    with per_sample_adapters(pipe.unet, ps, rows):
        images = pipe(["p a", "p b", "p c"], guidance_scale=5.0, ...).images

Training passes factors that require grad (e.g. an identity basis: one shared ``A`` per layer, ``B`` per row
built from the identities' codes) and ``rows=None`` (row i uses adapter i).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapter import Adapter

_ACTIVE: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # models with per-sample hooks installed
_ACTIVE_LOCK = threading.Lock()


@dataclass
class PerSampleLoRA:
    """S LoRA adapters, stacked per layer (the layers are the union of the adapters' layers).

    ``down[layer]`` is (S, r, n_flat) — one A per adapter — or (r, n_flat) when every adapter shares one A
    (an identity basis); ``up[layer]`` is (S, m, r); ``scale`` is (S,) (alpha / r times the user's scale).
    n_flat = n·kh·kw for Conv2d layers (A's conv kernel flattened, like ``weights.methods.lora``).
    A layer an adapter does not target holds zeros for it.
    """

    down: dict[str, Tensor]  # layer -> (S, r, n_flat) or shared (r, n_flat)
    up: dict[str, Tensor]  # layer -> (S, m, r)
    scale: Tensor  # (S,) per-adapter scale

    def __post_init__(self) -> None:
        if self.scale.dim() != 1:
            raise ValueError(f"scale must be (S,), got shape {tuple(self.scale.shape)}")
        if set(self.down) != set(self.up):
            raise ValueError("down and up must name the same layers")
        s = self.num_adapters
        for name, up in self.up.items():
            down = self.down[name]
            if up.dim() != 3 or up.shape[0] != s:
                raise ValueError(f"layer {name!r}: up must be (S={s}, m, r), got {tuple(up.shape)}")
            if down.dim() not in (2, 3) or (down.dim() == 3 and down.shape[0] != s):
                raise ValueError(f"layer {name!r}: down must be (S={s}, r, n) or (r, n), got {tuple(down.shape)}")
            if down.shape[-2] != up.shape[-1]:
                raise ValueError(f"layer {name!r}: down {tuple(down.shape)} and up {tuple(up.shape)} ranks differ")

    @property
    def num_adapters(self) -> int:
        return int(self.scale.shape[0])

    @property
    def layers(self) -> list[str]:
        return list(self.up)


def stack_adapters(
    adapters: Sequence[Adapter | None], scales: Sequence[float] | float = 1.0, *, dtype: torch.dtype | None = None
) -> PerSampleLoRA:
    """Stack S LoRA adapters (``spec.method == "lora"``; None = no adapter: zero factors) for one forward.

    Ranks may differ (zero-padded to the largest: exact); so may the targeted layers (zeros where one is not
    targeted). ``scales`` are the user's λ per adapter (one float for all). Tensors keep their autograd graph.
    """
    if not adapters:
        raise ValueError("stack_adapters needs at least one adapter")
    lam = [float(scales)] * len(adapters) if isinstance(scales, int | float) else [float(x) for x in scales]
    if len(lam) != len(adapters):
        raise ValueError(f"got {len(lam)} scales for {len(adapters)} adapters")
    shapes: dict[str, tuple[int, int]] = {}  # layer -> (m, n_flat), in first-seen order
    rank = 1
    for i, ad in enumerate(adapters):
        if ad is None:
            continue
        if ad.spec.method != "lora":
            raise ValueError(
                f"adapter {i} has method {ad.spec.method!r}; per-sample forward takes LoRA adapters "
                "(convert with weights.convert.to_lora)"
            )
        rank = max(rank, ad.spec.rank)
        for lay in ad.spec.layers:
            m, n_flat = lay.shape[0], int(torch.Size(lay.shape[1:]).numel())
            if shapes.setdefault(lay.name, (m, n_flat)) != (m, n_flat):
                raise ValueError(f"layer {lay.name!r} has other shapes in different adapters")
    if not shapes:
        raise ValueError("no adapter given (all None)")
    ref = next(ad for ad in adapters if ad is not None)
    ref_t = next(iter(ref.tensors.values()))
    dt = dtype or ref_t.dtype
    dev = ref_t.device
    down: dict[str, Tensor] = {}
    up: dict[str, Tensor] = {}
    for name, (m, n_flat) in shapes.items():
        downs, ups = [], []
        for ad in adapters:
            p = {} if ad is None else ad.layer_params(name)
            if "A" in p:
                A, B = p["A"].to(dev, dt), p["B"].to(dev, dt)  # (r_i, n_flat), (m, r_i)
                pad = rank - A.shape[0]
                A, B = F.pad(A, (0, 0, 0, pad)), F.pad(B, (0, pad))
            else:
                A, B = torch.zeros(rank, n_flat, device=dev, dtype=dt), torch.zeros(m, rank, device=dev, dtype=dt)
            downs.append(A)
            ups.append(B)
        down[name], up[name] = torch.stack(downs), torch.stack(ups)  # (S, r, n_flat), (S, m, r)
    scale = torch.tensor(
        [lam[i] * (ad.spec.scale if ad is not None else 0.0) for i, ad in enumerate(adapters)], device=dev, dtype=dt
    )
    return PerSampleLoRA(down, up, scale)


def batch_rows(index: Sequence[int] | Tensor, *, images_per_prompt: int = 1, cfg: bool = False) -> Tensor:
    """UNet row -> adapter map of a diffusers pipeline call.

    ``index[p]`` is the adapter of prompt p (-1: the base model). A pipeline repeats each prompt's row
    ``images_per_prompt`` times (consecutively), and with classifier-free guidance stacks the unconditional
    half before the conditional one: rows = [uncond rows, cond rows], both mapped to the prompt's adapter (a merged
    adapter acts on both halves too). Returns a (N,) int64 tensor, N = len(index) · images_per_prompt · (2 if cfg).
    """
    idx = torch.as_tensor(index, dtype=torch.long).reshape(-1).repeat_interleave(images_per_prompt)  # (P·n,)
    return torch.cat([idx, idx]) if cfg else idx


# ---- pure functions: one layer's per-row low-rank term ------------------------------------------------------


def linear_delta(x: Tensor, down: Tensor, up: Tensor) -> Tensor:
    """Row-wise ``B_i (A_i x_i)`` of a Linear layer.

    x (N, ..., n); down (N, r, n) per row or (r, n) shared; up (N, m, r) per row (scale folded in) -> (N, ..., m).
    """
    n_rows = x.shape[0]
    xf = x.reshape(n_rows, -1, x.shape[-1])  # (N, L, n)
    if down.dim() == 2:
        h = F.linear(xf, down)  # (N, L, r)
    else:
        h = torch.bmm(xf, down.transpose(1, 2))  # (N, L, r)
    out = torch.bmm(h, up.transpose(1, 2))  # (N, L, m)
    return out.reshape(*x.shape[:-1], up.shape[1])


def conv_delta(x: Tensor, down: Tensor, up: Tensor, conv: nn.Conv2d) -> Tensor:
    """Row-wise ``B_i ⋆ (A_i ⋆ x_i)``: A a conv with ``conv``'s kernel, stride, padding and dilation, B a 1x1 conv.

    x (N, n, H, W); down (N, r, n·kh·kw) per row or (r, n·kh·kw) shared; up (N, m, r) -> (N, m, H', W').
    """
    n_rows, n_in = x.shape[0], x.shape[1]
    kh, kw = conv.kernel_size
    r = down.shape[-2]
    if conv.padding_mode != "zeros":  # the layer's own padding, then a conv without it
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = 0
    else:
        padding = conv.padding
    if down.dim() == 2:
        h = F.conv2d(x, down.reshape(r, n_in, kh, kw), None, conv.stride, padding, conv.dilation)  # (N, r, H', W')
    else:  # one group per row: (1, N·n, H, W) ⋆ (N·r, n, kh, kw) -> (1, N·r, H', W')
        w = down.reshape(n_rows * r, n_in, kh, kw)
        h = F.conv2d(x.reshape(1, n_rows * n_in, *x.shape[2:]), w, None, conv.stride, padding, conv.dilation, n_rows)
        h = h.reshape(n_rows, r, *h.shape[2:])  # (N, r, H', W')
    return torch.einsum("nrhw,nmr->nmhw", h, up)  # (N, m, H', W')


# ---- the hooks -------------------------------------------------------------------------------------------------


def _hook(name: str, down: Tensor, up: Tensor, scale: Tensor, rows: Tensor | None):
    """A forward hook adding row-wise ``s B A x`` to the module's output (rows fixed: indices cached per device)."""
    n_adapters = scale.shape[0]
    if rows is not None:
        active = rows >= 0
        sel_cpu = None if bool(active.all()) else active.nonzero().squeeze(1)  # (N_a,) rows with an adapter
        rows_cpu = rows if sel_cpu is None else rows[sel_cpu]  # (N_a,) their adapters
    placed: dict[torch.device, tuple[Tensor, Tensor | None]] = {}

    def hook(mod: nn.Module, args: tuple, out: Tensor) -> Tensor:
        x = args[0]
        n_rows = x.shape[0]
        expected = n_adapters if rows is None else rows.shape[0]
        if n_rows != expected:
            raise ValueError(
                f"layer {name!r}: the UNet batch has {n_rows} rows but the adapters map {expected} "
                "(with classifier-free guidance pass rows=batch_rows(..., cfg=True))"
            )
        u = up.to(device=x.device, dtype=x.dtype) * scale.to(device=x.device, dtype=x.dtype)[:, None, None]
        d = down.to(device=x.device, dtype=x.dtype)  # (S, r, n) or (r, n)
        sel = None
        if rows is not None:
            if x.device not in placed:
                placed[x.device] = (
                    rows_cpu.to(x.device),
                    None if sel_cpu is None else sel_cpu.to(x.device),
                )
            r_map, sel = placed[x.device]
            if sel is not None:
                if sel.numel() == 0:
                    return out
                x = x[sel]
            u = u[r_map]  # (N_a, m, r)
            d = d if d.dim() == 2 else d[r_map]  # (r, n) or (N_a, r, n)
        delta = conv_delta(x, d, u, mod) if isinstance(mod, nn.Conv2d) else linear_delta(x, d, u)
        if sel is None:
            return out + delta
        return out.index_add(0, sel, delta.to(out.dtype))

    return hook


def _check_rows(rows: Tensor | Sequence[int] | None, s: int) -> Tensor | None:
    if rows is None:
        return None
    r = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
    if r.numel() == 0:
        raise ValueError("rows must map at least one UNet row")
    if int(r.max()) >= s or int(r.min()) < -1:
        raise ValueError(f"rows must hold adapter indices in [-1, {s - 1}], got {r.tolist()}")
    return r


@contextmanager
def per_sample_adapters(
    model: nn.Module,
    adapters: PerSampleLoRA,
    rows: Tensor | Sequence[int] | None = None,
    *,
    freeze_base: bool = True,
) -> Iterator[nn.Module]:
    """Within the block, every forward of ``model`` adds row i's adapter ``rows[i]`` at each of its layers.

    Args:
        model: the UNet (any nn.Module whose targeted Linear / Conv2d layers see the batch as dim 0).
        adapters: the S stacked adapters (:func:`stack_adapters`, or an identity basis' per-sample factors).
        rows: (N,) adapter index per batch row, -1 for the base model; None: row i uses adapter i (N == S).
            With classifier-free guidance a pipeline runs 2·B rows: pass :func:`batch_rows` ``(..., cfg=True)``.
        freeze_base: set requires_grad=False on the model's parameters for the block (flags restored after), so
            a backward pass reaches only the adapter tensors.

    Raises ValueError for a layer that is missing, is not Linear / Conv2d (groups 1), or has other shapes, and
    for a model that already has per-sample adapters installed. Hooks and flags are removed on exit, whatever
    happens inside.
    """
    r_map = _check_rows(rows, adapters.num_adapters)
    mods = dict(model.named_modules())
    for name in adapters.layers:
        mod = mods.get(name)
        if not isinstance(mod, nn.Linear | nn.Conv2d) or (isinstance(mod, nn.Conv2d) and mod.groups != 1):
            what = "missing" if mod is None else f"a {type(mod).__name__}"
            raise ValueError(f"per-sample layer {name!r} is {what} in the model (need nn.Linear / nn.Conv2d)")
        m, n_flat = mod.weight.shape[0], mod.weight[0].numel()
        down, up = adapters.down[name], adapters.up[name]
        if up.shape[1] != m or down.shape[-1] != n_flat:
            raise ValueError(
                f"layer {name!r}: weight {tuple(mod.weight.shape)} does not fit down {tuple(down.shape)} / "
                f"up {tuple(up.shape)}"
            )
    with _ACTIVE_LOCK:
        if model in _ACTIVE:
            raise ValueError("the model already has per-sample adapters installed (one block at a time)")
        _ACTIVE.add(model)
    flags = {id(p): p.requires_grad for p in model.parameters()} if freeze_base else None
    handles = []
    try:
        if freeze_base:
            model.requires_grad_(False)
        for name in adapters.layers:
            hook = _hook(name, adapters.down[name], adapters.up[name], adapters.scale, r_map)
            handles.append(mods[name].register_forward_hook(hook))
        yield model
    finally:
        for h in handles:
            h.remove()
        if flags is not None:
            for p in model.parameters():
                p.requires_grad_(flags.get(id(p), p.requires_grad))
        with _ACTIVE_LOCK:
            _ACTIVE.discard(model)


__all__ = [
    "PerSampleLoRA",
    "batch_rows",
    "conv_delta",
    "linear_delta",
    "per_sample_adapters",
    "stack_adapters",
]
