"""PyTorch port of dlib's face recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``).

The weights are read from dlib's own .dat file, so descriptors equal ``compute_face_descriptor(chips, 0)`` to
float tolerance, several times faster on CPU (dlib is built without BLAS here and holds the GIL).

Network (dlib's dnn_face_recognition_ex.cpp; 29 con layers), input side first: ``input_rgb_image_sized<150>``
(subtract the channel means, divide by 256) -> con 32 7x7/2 -> affine -> relu -> max_pool 3x3/2 -> 3 x ares 32 ->
ares_down 64 + 3 x ares 64 -> ares_down 128 + 2 x ares 128 -> ares_down 256 + 2 x ares 256 -> ares_down 256 ->
avg_pool_everything -> fc_no_bias 128. ``ares`` is ``relu(x + affine(con(relu(affine(con(x))))))``; ``ares_down``
strides its first con by 2 and adds ``avg_pool 2x2/2`` of its input instead of ``x``. dlib semantics kept here:

* ``con``/pool padding is 0 when the stride is not 1, else ``size // 2``; output sizes are floored
  (150 -> 72 -> 35 -> 17 -> 8 -> 4 -> 2).
* ``add_prev`` of two shapes (``tt::add``) zero-pads both to the larger one at the end of every axis: a down
  block's shortcut gets zero channels, and at 8x8 -> 3x3 (block) vs 4x4 (pool) the block output is added to the
  top-left 3x3 of the pooled shortcut (likewise 4x4 -> 1x1 vs 2x2 in the last block).

The layout of the .dat is checked field by field (versions, shapes, strides, paddings); anything else raises a
``ValueError`` naming the file. Parsing takes ~10 ms (tensors are raw float32), so nothing is cached on disk.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DlibFaceResNet", "Layer", "architecture", "read_dlib_resnet"]

Layer = tuple  # ("con", filters, size, stride) | ("affine",) | ("relu",) | pools | ("tag"|"skip"|"add_prev", id)
_SPECIAL_EXP = {32000: np.inf, 32001: -np.inf, 32002: np.nan}  # dlib float_details is_inf / is_ninf / is_nan


def _pad(size: int, stride: int) -> int:
    """dlib's default padding of a con or pool layer: 0 when strided, else ``size // 2``."""
    return 0 if stride != 1 else size // 2


def _ares(n: int, down: bool) -> list[Layer]:
    """``ares<n>`` or ``ares_down<n>`` from input side to output side."""
    head: list[Layer] = [("tag", 1), ("con", n, 3, 2 if down else 1), ("affine",), ("relu",)]
    head += [("con", n, 3, 1), ("affine",)]
    if down:
        return head + [("tag", 2), ("skip", 1), ("avg_pool", 2, 2), ("add_prev", 2), ("relu",)]
    return head + [("add_prev", 1), ("relu",)]


def architecture() -> list[Layer]:
    """The layers of dlib's face ResNet in forward order (input side first)."""
    layers: list[Layer] = [("con", 32, 7, 2), ("affine",), ("relu",), ("max_pool", 3, 2)]
    for n, downs in ((32, (0, 0, 0)), (64, (1, 0, 0, 0)), (128, (1, 0, 0)), (256, (1, 0, 0)), (256, (1,))):
        for down in downs:
            layers += _ares(n, bool(down))
    return layers + [("avg_pool", 0, 1), ("fc", 128)]


class _Reader:
    """dlib's serialization primitives over an in-memory file; every error names the file."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.path, self.pos = memoryview(data), path, 0

    def fail(self, what: str) -> ValueError:
        return ValueError(f"{self.path}: not dlib's face recognition ResNet v1 ({what} at byte {self.pos})")

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise self.fail(f"truncated: needs {n} more bytes")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        ctrl = self.take(1)[0]
        size = ctrl & 0x0F
        if size == 0 or size > 8 or ctrl & 0x70:
            raise self.fail(f"bad integer control byte 0x{ctrl:02x}")
        value = int.from_bytes(self.take(size), "little")
        return -value if ctrl & 0x80 else value

    def float(self) -> float:
        mantissa, exponent = self.int(), self.int()
        if exponent in _SPECIAL_EXP:
            return float(_SPECIAL_EXP[exponent])
        try:
            return math.ldexp(float(mantissa), exponent)
        except OverflowError:
            raise self.fail(f"float out of range ({mantissa} * 2**{exponent})") from None

    def str(self) -> str:
        n = self.int()
        if not 0 <= n <= 64:
            raise self.fail(f"implausible string length {n}")
        return bytes(self.take(n)).decode("latin-1")

    def bool(self) -> bool:
        ch = self.take(1)[0]
        if ch not in b"01":
            raise self.fail(f"bad bool byte 0x{ch:02x}")
        return ch == ord("1")

    def expect(self, what: str, got: object, *allowed: object) -> None:
        if got not in allowed:
            raise self.fail(f"expected {what} {' or '.join(map(repr, allowed))}, found {got!r}")

    def version(self, *allowed: str) -> str:
        s = self.str()
        self.expect("version", s, *allowed)
        return s

    def tensor(self) -> np.ndarray:
        self.expect("tensor version", self.int(), 2)  # 2 = raw little-endian float32 (1 = dlib floats, pre-2016)
        shape = tuple(self.int() for _ in range(4))
        if any(d < 0 for d in shape):
            raise self.fail(f"negative tensor shape {shape}")
        count = math.prod(shape)
        return np.frombuffer(self.take(4 * count), dtype="<f4").reshape(shape)

    def alias(self) -> tuple[int, ...]:
        self.expect("alias_tensor version", self.int(), 1)
        return tuple(self.int() for _ in range(4))

    def ints(self, n: int) -> tuple[int, ...]:
        return tuple(self.int() for _ in range(n))


def _read_layer(r: _Reader, layer: Layer, cin: int) -> tuple[dict[str, np.ndarray], int]:
    """One computational layer's details; returns its arrays and its output channel count."""
    kind = layer[0]
    if kind == "con":
        _, n, k, stride = layer
        version = r.version("con_4", "con_5")
        params = r.tensor().reshape(-1)
        pad = _pad(k, stride)
        r.expect("con (filters, nr, nc, strides, paddings)", r.ints(7), (n, k, k, stride, stride, pad, pad))
        r.expect("con filter shape", r.alias(), (n, cin, k, k))
        r.expect("con bias shape", r.alias(), (1, n, 1, 1))
        [r.float() for _ in range(4)]  # learning-rate and weight-decay multipliers
        if version == "con_5":
            r.expect("con use_bias", r.bool(), True)
        r.expect("con parameter count", params.size, n * cin * k * k + n)
        return {"weight": params[: n * cin * k * k].reshape(n, cin, k, k), "bias": params[n * cin * k * k :]}, n
    if kind == "affine":
        r.version("affine_")
        params = r.tensor().reshape(-1)
        r.expect("affine gamma shape", r.alias(), (1, cin, 1, 1))
        r.expect("affine beta shape", r.alias(), (1, cin, 1, 1))
        r.expect("affine mode (CONV_MODE)", r.int(), 0)
        r.expect("affine parameter count", params.size, 2 * cin)
        return {"gamma": params[:cin], "beta": params[cin:]}, cin
    if kind in ("max_pool", "avg_pool"):
        _, size, stride = layer
        r.version(f"{kind}_2")
        pad = _pad(size, stride)
        r.expect(f"{kind} (nr, nc, strides, paddings)", r.ints(6), (size, size, stride, stride, pad, pad))
        return {}, cin
    if kind == "relu":
        r.version("relu_")
        return {}, cin
    if kind == "add_prev":
        r.version("add_prev_")
        return {}, -1  # channel count set by the caller (max of both inputs)
    if kind == "fc":
        r.version("fc_2")
        r.expect("fc (outputs, inputs)", r.ints(2), (layer[1], cin))
        params = r.tensor().reshape(-1)
        r.expect("fc weight shape", r.alias(), (cin, layer[1], 1, 1))
        r.expect("fc bias shape", r.alias(), (0, 0, 0, 0))
        r.expect("fc bias mode (FC_NO_BIAS)", r.int(), 1)
        [r.float() for _ in range(4)]
        r.expect("fc parameter count", params.size, cin * layer[1])
        return {"weight": params.reshape(cin, layer[1]).T}, layer[1]
    raise AssertionError(kind)


def read_dlib_resnet(path: str | Path) -> dict[str, np.ndarray]:
    """Parse ``dlib_face_recognition_resnet_model_v1.dat`` into float32 arrays (``ValueError`` on another layout).

    Keys: ``mean`` (3,), ``L{i}.weight``/``L{i}.bias`` for con and fc, ``L{i}.gamma``/``L{i}.beta`` for affine,
    ``i`` being the index in :func:`architecture`.
    """
    path = Path(path)
    r = _Reader(path.read_bytes(), path)
    layers = architecture()
    r.expect("add_loss_layer version", r.int(), 1)
    r.version("loss_metric_", "loss_metric_2")
    r.float(), r.float()  # margin, distance threshold
    for i, layer in reversed(list(enumerate(layers))):  # add_layer / tag / skip headers, outermost first
        first_version = r.int()  # the loop ends at layer 0, whose add_layer<.., input> may be version 3
        allowed = (1,) if layer[0] in ("tag", "skip") else (2, 3) if i == 0 else (2,)
        r.expect(f"{layer[0]} header version", first_version, *allowed)
    r.version("input_rgb_image_sized")
    out = {"mean": np.array([r.float() for _ in range(3)], dtype=np.float32)}
    r.expect("input size", r.ints(2), (150, 150))
    channels, tags = 3, {}
    for i, layer in enumerate(layers):
        if layer[0] in ("tag", "skip"):
            if layer[0] == "tag":
                tags[layer[1]] = channels
            else:
                channels = tags[layer[1]]
            continue
        arrays, cout = _read_layer(r, layer, channels)
        channels = max(channels, tags[layer[1]]) if layer[0] == "add_prev" else cout
        out.update({f"L{i}.{k}": np.array(v, dtype=np.float32) for k, v in arrays.items()})  # copies
        r.bool(), r.bool(), r.bool()  # setup called, gradient stale, output getters disabled
        for _ in range(3):  # x_grad, cached_output, params_grad (grad_final): empty in a cleaned net
            r.tensor()
        if i == 0 and first_version == 3:
            r.int()  # _sample_expansion_factor (add_layer<.., input> version 3)
    if r.pos != len(r.data):
        raise r.fail(f"{len(r.data) - r.pos} unexpected trailing bytes")
    return out


def _pad_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's ``tt::add``: shapes differing -> both zero-padded at the end of each axis to the larger shape."""
    if a.shape == b.shape:
        return a + b
    shape = [max(x, y) for x, y in zip(a.shape, b.shape)]

    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, shape[3] - t.shape[3], 0, shape[2] - t.shape[2], 0, shape[1] - t.shape[1]))

    return pad(a) + pad(b)


class _Block(nn.Module):
    """``ares`` / ``ares_down``: relu(block(x) + shortcut(x)), shortcut = x or avg_pool 2x2/2."""

    def __init__(self, conv1: nn.Conv2d, conv2: nn.Conv2d, down: bool) -> None:
        super().__init__()
        self.conv1, self.conv2, self.down = conv1, conv2, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.relu(self.conv1(x)))
        return F.relu(_pad_add(y, F.avg_pool2d(x, 2, 2) if self.down else x))


class DlibFaceResNet(nn.Module):
    """dlib's face ResNet in eval mode: uint8 RGB chips ``(N, 150, 150, 3)`` -> raw descriptors ``(N, 128)``.

    Each ``affine`` (dlib's frozen batch norm) is folded into the ``con`` before it. No L2 normalisation.
    """

    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        super().__init__()
        convs: list[nn.Conv2d] = []
        layers = architecture()
        for i, layer in enumerate(layers):
            if layer[0] == "con":
                w, b = weights[f"L{i}.weight"], weights[f"L{i}.bias"]
                g, beta = weights[f"L{i + 1}.gamma"], weights[f"L{i + 1}.beta"]  # the affine right after it
                n, cin, k, _ = w.shape
                stride = layer[3]
                conv = nn.Conv2d(cin, n, k, stride, _pad(k, stride))
                conv.weight.data = torch.from_numpy(w * g[:, None, None, None])
                conv.bias.data = torch.from_numpy(b * g + beta)
                convs.append(conv)
        self.register_buffer("mean", torch.from_numpy(weights["mean"].copy()).view(1, 3, 1, 1))
        self.stem = convs[0]
        self.blocks = nn.ModuleList(
            _Block(convs[j], convs[j + 1], convs[j].stride[0] == 2) for j in range(1, len(convs), 2)
        )
        fc = next(i for i, layer in enumerate(layers) if layer[0] == "fc")
        self.fc = nn.Linear(*weights[f"L{fc}.weight"].shape[::-1], bias=False)
        self.fc.weight.data = torch.from_numpy(weights[f"L{fc}.weight"].copy())
        # NHWC convolutions: 1.38x faster for one chip, 1.07x for ten (2 threads, AVX2 EPYC), same numbers to 1e-7
        self.to(memory_format=torch.channels_last).eval().requires_grad_(False)

    @classmethod
    def from_dat(cls, path: str | Path) -> DlibFaceResNet:
        """Build from dlib's .dat (``ValueError`` naming the file when the layout is not this network)."""
        return cls(read_dlib_resnet(path))

    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        x = ((chips.permute(0, 3, 1, 2).float() - self.mean) / 256.0).contiguous(memory_format=torch.channels_last)
        x = F.max_pool2d(F.relu(self.stem(x)), 3, 2)
        for block in self.blocks:
            x = block(x)
        return self.fc(x.mean(dim=(2, 3)))

    def embed(self, chips: np.ndarray | Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
        """Raw 128-d descriptors ``(N, 128)`` float32 of uint8 RGB chips (N x 150 x 150 x 3)."""
        if isinstance(chips, (list, tuple)):
            chips = np.stack(chips) if len(chips) else np.zeros((0, 150, 150, 3), np.uint8)
        arr = np.ascontiguousarray(chips, dtype=np.uint8)
        if arr.ndim != 4 or arr.shape[1:] != (150, 150, 3):
            raise ValueError(f"chips must be (N, 150, 150, 3) uint8, got shape {arr.shape}")
        with torch.inference_mode():
            outs = [self(torch.from_numpy(arr[i : i + batch_size])) for i in range(0, len(arr), batch_size)]
        return torch.cat(outs).numpy() if outs else np.zeros((0, self.fc.out_features), np.float32)
