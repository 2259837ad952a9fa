"""Fast math properties of the matrix TDLRT step (float64 dense references), through the public API."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tdrlt_peft import TDLRTIntegrator, adapter_ranks
from tdrlt_peft.layers.adapter import Linear
from tdrlt_peft.math.geometry import augment_basis, orthogonality_error, truncation_rank

from .helpers import dense_weight, only_storage, tangent_projection
from .tolerances import GRADIENT, IDENTITY, ORTHONORMAL


def make_layer(n_out=12, n_in=10, r=3, r_max=8, tau=0.0, dtype=torch.float64, scale=1.0, r_min=1, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(n_in, n_out, bias=False).to(dtype)
    base.weight.requires_grad_(False)
    layer = Linear(base, "default", r=r, r_min=r_min, r_max=r_max, tau=tau, scale=scale)
    return layer


def set_core(layer, S):
    r = S.shape[0]
    with torch.no_grad():
        layer.tdlrt_S["default"][:r, :r] = S


def dense_grad(layer, x, target):
    """G = dL/d(ΔW) by autograd on the dense weight W0 + s ΔW, and the loss."""
    s = only_storage(layer)
    delta = dense_weight(s).detach().requires_grad_(True)
    W = layer.base_layer.weight + layer.tdlrt_scale["default"] * delta
    loss = 0.5 * ((x @ W.T - target) ** 2).sum()
    loss.backward()
    return delta.grad, loss.item()


def layer_loss(layer, x, target):
    loss = 0.5 * ((layer(x) - target) ** 2).sum()
    loss.backward()
    return loss.item()


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_custom_backward_equals_dense_autograd(scale):
    layer = make_layer(scale=scale)
    set_core(layer, torch.randn(3, 3, dtype=torch.float64))
    x, target = torch.randn(7, 10, dtype=torch.float64), torch.randn(7, 12, dtype=torch.float64)
    G, _ = dense_grad(layer, x, target)
    layer_loss(layer, x, target)
    U, V = layer.tdlrt_U["default"][:, :3].detach(), layer.tdlrt_V["default"][:, :3].detach()
    tol = GRADIENT[torch.float64]
    torch.testing.assert_close(layer.tdlrt_U["default"].grad[:, :3], G @ V, atol=tol, rtol=0)
    torch.testing.assert_close(layer.tdlrt_V["default"].grad[:, :3], G.T @ U, atol=tol, rtol=0)
    torch.testing.assert_close(layer.tdlrt_S["default"].grad[:3, :3], U.T @ G @ V, atol=tol, rtol=0)
    # storage past the active rank receives no gradient
    assert layer.tdlrt_U["default"].grad[:, 3:].abs().max() == 0


def test_input_gradient_equals_dense_autograd():
    layer = make_layer()
    set_core(layer, torch.randn(3, 3, dtype=torch.float64))
    x = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    layer(x).pow(2).sum().backward()
    dense_x = x.detach().clone().requires_grad_(True)
    W = layer.base_layer.weight + dense_weight(only_storage(layer)).detach()
    (dense_x @ W.T).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, dense_x.grad, atol=GRADIENT[torch.float64], rtol=0)


@pytest.mark.parametrize("zero_core", [False, True])
def test_sgd_step_is_tangent_projected_gradient_step(zero_core):
    """Ĉ x Û = W - lr P_T(G) exactly when tau = 0 and no rank cap binds."""
    layer = make_layer(r=3, r_max=8)
    if not zero_core:
        set_core(layer, torch.randn(3, 3, dtype=torch.float64))
    s = only_storage(layer)
    U, V = s.active()[1]
    U, V = U.detach().clone(), V.detach().clone()
    W_before = dense_weight(s).detach().clone()
    x, target = torch.randn(9, 10, dtype=torch.float64), torch.randn(9, 12, dtype=torch.float64)
    G, _ = dense_grad(layer, x, target)
    layer_loss(layer, x, target)
    lr = 0.05
    assert TDLRTIntegrator(layer, core_optimizer="sgd").step(lr)
    expected = W_before - lr * tangent_projection(U, V, G)
    torch.testing.assert_close(dense_weight(only_storage(layer)), expected, atol=IDENTITY[torch.float64], rtol=0)
    assert adapter_ranks(layer)[""] == (6, 6)   # W - lr P_T(G) has rank 2r generically


def test_step_clears_factor_gradients_and_keeps_bases_orthonormal():
    layer = make_layer()
    x, target = torch.randn(9, 10, dtype=torch.float64), torch.randn(9, 12, dtype=torch.float64)
    layer_loss(layer, x, target)
    TDLRTIntegrator(layer).step(0.01)
    s = only_storage(layer)
    assert all(p.grad is None for p in s.parameters())
    for U in s.active()[1]:
        assert orthogonality_error(U.detach()) < ORTHONORMAL[torch.float64]


def reference_rank(sigma: np.ndarray, tau: float, r_min: int, r_max: int) -> int:
    """Independent reference: smallest k with ||sigma[k:]|| <= tau ||sigma||, clamped."""
    sigma = np.where(sigma > 100 * np.finfo(sigma.dtype).eps * sigma[0], sigma, 0.0)
    total = np.linalg.norm(sigma)
    k = next(k for k in range(len(sigma) + 1) if np.linalg.norm(sigma[k:]) <= tau * total)
    return int(min(max(k, r_min), min(r_max, len(sigma))))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("tau", [0.0, 0.05, 0.3])
def test_truncation_rank_matches_numpy_svd(seed, tau):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((12, 5)) @ np.diag(np.logspace(0, -3, 5)) @ rng.standard_normal((5, 9))
    sigma = np.linalg.svd(A, compute_uv=False)
    for r_min, r_max in [(1, 12), (2, 4), (6, 12)]:
        got = truncation_rank(torch.from_numpy(sigma), tau, r_min, r_max)
        assert got == reference_rank(sigma, tau, r_min, r_max)


def test_tau_zero_keeps_exact_rank_not_roundoff():
    A = torch.randn(10, 3, dtype=torch.float64) @ torch.randn(3, 10, dtype=torch.float64)
    sigma = torch.linalg.svdvals(A)
    assert truncation_rank(sigma, 0.0, 1, 10) == 3
    assert truncation_rank(sigma.float(), 0.0, 1, 10) == 3


def test_augmentation_with_rank_deficient_gradient_stays_orthogonal():
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(20, 4, dtype=torch.float64))
    g = torch.randn(20, 1, dtype=torch.float64)
    G = g @ torch.randn(1, 4, dtype=torch.float64)       # rank 1, r = 4 columns
    new = augment_basis(U, G, max_new=4)
    assert new.shape[1] == 1
    assert (new.T @ U).abs().max() < ORTHONORMAL[torch.float64]
    assert orthogonality_error(torch.cat([U, new], 1)) < ORTHONORMAL[torch.float64]
    # a gradient inside span(U) adds nothing
    assert augment_basis(U, U @ torch.randn(4, 4, dtype=torch.float64), 4).shape[1] == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rank_one_gradient_keeps_layer_orthonormal(dtype):
    layer = make_layer(r=4, r_max=10, tau=0.0, dtype=dtype)
    set_core(layer, torch.randn(4, 4, dtype=dtype))
    x, target = torch.randn(1, 10, dtype=dtype), torch.randn(1, 12, dtype=dtype)   # batch 1: G rank 1
    layer_loss(layer, x, target)
    TDLRTIntegrator(layer, core_optimizer="sgd").step(0.1)
    for U in only_storage(layer).active()[1]:
        assert orthogonality_error(U.detach()) < ORTHONORMAL[dtype]
    assert adapter_ranks(layer)[""][0] <= 6   # 4 + one new direction per side at most


@pytest.mark.parametrize("r_min,r_max", [(2, 5), (1, 3), (4, 8)])
def test_rank_bounds_respected(r_min, r_max):
    layer = make_layer(r=min(max(3, r_min), r_max), r_min=r_min, r_max=r_max, tau=0.5)
    torch.manual_seed(1)
    for _ in range(15):
        x, target = torch.randn(9, 10, dtype=torch.float64), torch.randn(9, 12, dtype=torch.float64)
        layer_loss(layer, x, target)
        TDLRTIntegrator(layer).step(0.05)
        r = adapter_ranks(layer)[""]
        assert r_min <= r[0] <= r_max and r[0] == r[1]


def test_float32_bases_stay_orthonormal_over_2000_steps():
    layer = make_layer(n_out=24, n_in=16, r=4, r_max=10, tau=0.05, dtype=torch.float32)
    integrator = TDLRTIntegrator(layer, core_optimizer="sgd")
    g = torch.Generator().manual_seed(0)
    W_star = torch.randn(24, 3, generator=g) @ torch.randn(3, 16, generator=g)
    for _ in range(2000):
        x = torch.randn(16, 16, generator=g)
        layer_loss(layer, x, x @ W_star.T)
        integrator.step(0.01)
    s = only_storage(layer)
    for U in s.active()[1]:
        assert orthogonality_error(U.detach()) < ORTHONORMAL[torch.float32]
    assert torch.isfinite(dense_weight(s)).all()


@pytest.mark.parametrize("core_optimizer,lr", [("sgd", 0.005), ("adam", 0.1)])
def test_low_rank_regression_finds_the_rank(core_optimizer, lr):
    """Target of rank 3 plus noise, r_init = 8, tau = 0.05: the loss decreases and the ranks settle at 3."""
    g = torch.Generator().manual_seed(0)
    n_out, n_in = 30, 20
    Uo, _ = torch.linalg.qr(torch.randn(n_out, 3, generator=g, dtype=torch.float64))
    Vo, _ = torch.linalg.qr(torch.randn(n_in, 3, generator=g, dtype=torch.float64))
    W_star = Uo @ torch.diag(torch.tensor([5.0, 3.0, 2.0], dtype=torch.float64)) @ Vo.T
    layer = make_layer(n_out=n_out, n_in=n_in, r=8, r_max=16, tau=0.05)
    layer.base_layer.weight.data.zero_()   # ΔW itself must learn the rank-3 target
    integrator = TDLRTIntegrator(layer, core_optimizer=core_optimizer)
    losses = []
    for _ in range(300):
        x = torch.randn(64, n_in, generator=g, dtype=torch.float64)
        target = x @ W_star.T + 0.01 * torch.randn(64, n_out, generator=g, dtype=torch.float64)
        losses.append(layer_loss(layer, x, target) / 64)
        integrator.step(lr)
    assert np.mean(losses[-20:]) < 0.01 * np.mean(losses[:5])
    assert adapter_ranks(layer)[""] == (3, 3)
