"""Each method's ΔW against its formula in docs/weights.md, computed independently in float64 (explicit loops,
materialised matrices, torch.linalg factorisations), not against the method's own forward."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tests.utils.adapters import make_adapter
from tests.utils.tiny_pipes import tiny_sd15_unet
from weights.convert import layer_deltas, to_lora
from weights.methods import METHODS, MethodConfig
from weights.methods.snell import kernel_delta

torch.set_num_threads(1)
TOL = {"rtol": 1e-5, "atol": 1e-5}  # the methods compute in fp32


def _rn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _delta(name: str, W: torch.Tensor, p: dict, cfg: MethodConfig) -> torch.Tensor:
    return METHODS[name].delta(W, p, cfg).double().reshape(W.shape[0], -1)


def test_lora_and_dora():
    g = torch.Generator().manual_seed(0)
    W, A, B, s = _rn(g, 8, 6, 3, 3), _rn(g, 2, 54), _rn(g, 8, 2), 0.5
    cfg = MethodConfig(rank=2, scale=s)
    torch.testing.assert_close(_delta("lora", W, {"A": A, "B": B}, cfg), s * B @ A, **TOL)
    mu = _rn(g, 8).abs() + 1
    V = W.reshape(8, -1) + s * B @ A  # DoRA: diag(μ / ‖V‖_row) V − W, row norm over (c_in, kh, kw)
    ref = (mu / V.norm(dim=1))[:, None] * V - W.reshape(8, -1)
    torch.testing.assert_close(_delta("dora", W, {"A": A, "B": B, "magnitude": mu}, cfg), ref, **TOL)


@pytest.mark.parametrize("shape", [(10, 12), (12, 10)])
def test_svfit_with_trained_singular_values(shape):
    g = torch.Generator().manual_seed(1)
    W, r = _rn(g, *shape), 3
    p = METHODS["svfit"].init_layer(W.float(), MethodConfig(rank=r))
    U, S, Vh = torch.linalg.svd(W)
    p["sigma"] = (S[:r] + _rn(g, r)).float()  # W' = W − U_r S_r V_rᵀ + U_r diag(σ) V_rᵀ
    ref = U[:, :r] @ torch.diag(p["sigma"].double() - S[:r]) @ Vh[:r]
    torch.testing.assert_close(_delta("svfit", W, p, MethodConfig(rank=r)), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(10, 12), (12, 10), (8, 3, 2, 2)])
def test_loldu_first_r_pivots(shape):
    g = torch.Generator().manual_seed(2)
    W, r, c = _rn(g, *shape), 3, 0.4
    cfg = MethodConfig(rank=r, scale=c)
    p = METHODS["loldu"].init_layer(W.float(), cfg)
    P, L, U = torch.linalg.lu(W.reshape(shape[0], -1))  # W = P L U, D = diag(U), Ū = D⁻¹U
    D = torch.diagonal(U)
    Ub = U / D[:, None]
    torch.testing.assert_close(p["z0"].double(), D[:r], **TOL)  # the FIRST r pivot steps
    p["z"] = (D[:r] + _rn(g, r)).float()
    ref = c * P @ L[:, :r] @ torch.diag(p["z"].double() - D[:r]) @ Ub[:r]
    torch.testing.assert_close(_delta("loldu", W.float(), p, cfg), ref, rtol=1e-4, atol=1e-4)


def test_arc_weight_and_bias():
    g = torch.Generator().manual_seed(3)
    W, D, c, b = _rn(g, 10, 12), _rn(g, 12, 3), _rn(g, 3), _rn(g, 12)
    p, cfg = {"D": D, "c": c, "b": b}, MethodConfig(rank=3)
    ref = W @ (torch.eye(12, dtype=torch.float64) + D @ torch.diag(c) @ D.T) - W  # W(I + D diag(c) Dᵀ) − W
    torch.testing.assert_close(_delta("arc", W, p, cfg), ref, **TOL)
    torch.testing.assert_close(METHODS["arc"].bias_delta(W, p, cfg).double(), W @ b, **TOL)  # Δbias = W b


@pytest.mark.parametrize("shape", [(7, 10), (10, 7)])
def test_hta_householder_form(shape):
    g = torch.Generator().manual_seed(4)
    m, n = shape
    v_l, v_r, d, w_u, w_d = _rn(g, m), _rn(g, n), _rn(g, min(m, n)), _rn(g, m), _rn(g, n)
    H_l = torch.eye(m, dtype=torch.float64) - torch.outer(v_l, v_l)
    H_r = torch.eye(n, dtype=torch.float64) - torch.outer(v_r, v_r)
    Dm = torch.zeros(m, n, dtype=torch.float64)
    Dm[: len(d), : len(d)] = torch.diag(d)
    ref = H_l @ Dm @ H_r + torch.outer(w_u, w_d)
    p = {"v_l": v_l, "v_r": v_r, "d": d, "w_u": w_u, "w_d": w_d}
    torch.testing.assert_close(_delta("hta", torch.zeros(m, n, dtype=torch.float64), p, MethodConfig()), ref, **TOL)


def test_snell_kernel_by_explicit_distances():
    g = torch.Generator().manual_seed(5)
    m, n, h = 5, 4, 2
    a1, a2, b1, b2 = _rn(g, n, h), _rn(g, n, h), _rn(g, m, h), _rn(g, m, h)
    ref = torch.zeros(m, n, dtype=torch.float64)
    for j, i in itertools.product(range(m), range(n)):
        ref[j, i] = 0.1 * (a1[i] - b1[j]).norm() - 0.1 * (a2[i] - b2[j]).norm()
    torch.testing.assert_close(kernel_delta({"a1": a1, "a2": a2, "b1": b1, "b2": b2}).double(), ref, **TOL)


def _fold(idx: tuple[int, ...], fs: tuple[int, ...]) -> int:
    i, mul = 0, 1  # little-endian: i = i_1 + n_1 i_2 + n_1 n_2 i_3
    for a, f in zip(idx, fs):
        i, mul = i + a * mul, mul * f
    return i


def _trm(cores: list[torch.Tensor], fs: tuple[int, ...]) -> torch.Tensor:
    n, R = math.prod(fs), cores[0].shape[-1]
    T = torch.zeros(n, n, dtype=torch.float64)
    for I in itertools.product(*map(range, fs)):
        for J in itertools.product(*map(range, fs)):
            M = torch.eye(R, dtype=torch.float64)
            for d, core in enumerate(cores):
                M = M @ core[I[d], J[d]]
            T[_fold(I, fs), _fold(J, fs)] = torch.trace(M)
    return T


def _tr(P: list[torch.Tensor], Q: list[torch.Tensor], fm: tuple[int, ...], fn: tuple[int, ...]) -> torch.Tensor:
    R = P[0].shape[-1]
    out = torch.zeros(math.prod(fm), math.prod(fn), dtype=torch.float64)
    for I in itertools.product(*map(range, fm)):
        left = torch.eye(R, dtype=torch.float64)
        for d, core in enumerate(P):
            left = left @ core[I[d]]
        for J in itertools.product(*map(range, fn)):
            right = torch.eye(R, dtype=torch.float64)
            for d, core in enumerate(Q):
                right = right @ core[J[d]]
            out[_fold(I, fm), _fold(J, fn)] = torch.trace(left @ right)
    return out


@pytest.mark.parametrize("shape", [(6, 12), (12, 8), (4, 6, 1, 1), (4, 3, 2, 2)])
def test_tlora_tensor_ring_transform_and_residual(shape):
    g = torch.Generator().manual_seed(6)
    m, cfg = METHODS["tlora"], MethodConfig(rank=2)
    W = _rn(g, *shape)
    p0 = m.init_layer(W.float(), cfg, torch.Generator().manual_seed(1))
    ft, fm, fn = m.factors(shape, cfg)
    nT = len(ft)
    T0 = _trm([p0[f"T{d}"].double() for d in range(nT)], ft)
    torch.testing.assert_close(T0, torch.eye(T0.shape[0], dtype=torch.float64), **TOL)  # T = I at init
    p = {k: v.double() + 0.3 * _rn(g, *v.shape) for k, v in p0.items()}
    T = _trm([p[f"T{d}"] for d in range(nT)], ft)
    res = _tr([p[f"P{d}"] for d in range(len(fm))], [p[f"Q{d}"] for d in range(len(fn))], fm, fn)
    if len(shape) == 2:
        ref = W @ T - W + res  # W' = W T + Δ
    else:  # conv: T acts on the input channels at every kernel position
        ref = (torch.einsum("ochw,cd->odhw", W, T) - W).reshape(shape[0], -1) + res
    torch.testing.assert_close(_delta("tlora", W, p, cfg), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["tlora", "hta", "snell", "svfit"])
def test_conversion_to_lora_is_the_best_rank_r_approximation(method):
    unet = tiny_sd15_unet()
    ad = make_adapter(unet, method, 4, targets=["to_q", "proj_in"], noise=1.0, seed=7)
    lora, report = to_lora(ad, 2, unet)
    full = {lay.name: dW.double() for lay, dW, _ in layer_deltas(ad, unet)}
    for lay, dW2, _ in layer_deltas(lora):
        S = torch.linalg.svdvals(full[lay.name])
        optimal = float(S[2:].square().sum().sqrt() / S.square().sum().sqrt())  # Eckart–Young
        actual = float((full[lay.name] - dW2.double()).norm() / full[lay.name].norm())
        assert actual == pytest.approx(optimal, rel=1e-3, abs=1e-5)
        assert report.errors[lay.name] == pytest.approx(actual, rel=1e-3, abs=1e-5)
