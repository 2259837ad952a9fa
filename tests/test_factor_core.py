"""``core_optimizer="adam_factors"``: the core's old block moves along the factors' Adam directions
(``engine.factor_direction``).

At tau = 0, with room in the storage for every new direction, one step moves the unscaled weight by
``-lr Σ_i Ten_i(D_Ki Q_i^T) x_{j != i} U_j``, with ``D_Ki`` the Adam direction of the K-gradient ``G_Ki``: for a
matrix ``-lr (D_K V^T + U D_L^T)``, LoRA's two-factor step in orthonormal coordinates. Checked against that dense
formula in float64 (a linear and a 3 x 3 convolution), and against plain Adam (which does not satisfy it). The
two-pass step takes plain Adam's core step.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn

import tdrlt_peft
from tdrlt_peft import TDLRTIntegrator
from tdrlt_peft.math.tucker import fold, multi_mode_dot, unfold

from .helpers import dense_weight, only_storage
from .tolerances import IDENTITY

F64 = torch.float64
EPS = 1e-8
LAYERS = {"linear": ((4, 10), lambda: nn.Linear(10, 12)), "conv": ((4, 4, 5, 5), lambda: nn.Conv2d(4, 6, 3, padding=1))}


def adapted(kind: str, core_optimizer: str):
    torch.manual_seed(0)
    base = nn.Sequential(LAYERS[kind][1]()).to(F64)
    config = tdrlt_peft.TuckerAdapterConfig(target_modules=["0"], r=2, r_max=8, tau=0.0, adam_eps=EPS,
                                            core_optimizer=core_optimizer)
    model = get_peft_model(base, config)
    with torch.no_grad():                      # a nonzero core: the step starts from a generic point
        core = only_storage(model).active()[0]
        core.copy_(torch.randn(core.shape, dtype=F64))
    return model


def data(model, kind):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(LAYERS[kind][0], dtype=F64, generator=g)
    return x, torch.randn(model(x).shape, dtype=F64, generator=g)


def unscaled_gradient(model, kind, x, y):
    """dL/dW for the unscaled adapter weight W (the layer computes with W0 + scale W), from a dense copy."""
    storage = only_storage(model)
    layer = model.base_model.model[0].get_base_layer()
    W = dense_weight(storage).detach().requires_grad_()
    weight = layer.weight + float(storage.scale) * W
    out = F.linear(x, weight, layer.bias) if kind == "linear" else F.conv2d(x, weight, layer.bias, padding=1)
    (0.5 * ((out - y) ** 2).sum()).backward()
    return W.grad


def factor_step(W_core, factors, G, lr, matrix):
    """``W - lr Σ_i Ten_i(D_Ki Q_i^T) x_{j != i} U_j``, ``D = g / (|g| + eps)`` (Adam's first step); a matrix
    ``U S V^T`` has ``Q = I`` (``G_K = G V``, ``G_L = G^T U``), a Tucker core ``Mat_i(C)^T = Q_i R_i``."""
    step = torch.zeros_like(G)
    for i, U in enumerate(factors):
        if U is None:
            continue
        Q = torch.eye(unfold(W_core, i).shape[1], dtype=F64) if matrix else torch.linalg.qr(unfold(W_core, i).T)[0]
        G_K = unfold(multi_mode_dot(G, factors, skip=i, transpose=True), i) @ Q
        shape = list(W_core.shape)
        shape[i] = U.shape[0]
        step = step + multi_mode_dot(fold((G_K / (G_K.abs() + EPS)) @ Q.T, i, shape), factors, skip=i)
    return multi_mode_dot(W_core, factors) - lr * step


def stepped(kind, core_optimizer, lr):
    model = adapted(kind, core_optimizer)
    x, y = data(model, kind)
    G = unscaled_gradient(model, kind, x, y)
    core, factors = only_storage(model).active()
    expected = factor_step(core.detach().clone(), [None if U is None else U.detach().clone() for U in factors], G, lr,
                           kind == "linear")
    (0.5 * ((model(x) - y) ** 2).sum()).backward()
    TDLRTIntegrator(model, core_optimizer=core_optimizer).step(lr)
    return dense_weight(only_storage(model)), expected, only_storage(model)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_factor_core_step_is_the_factors_adam_step(kind):
    lr = 1e-2
    weight, expected, storage = stepped(kind, "adam_factors", lr)
    assert storage.ranks[0] == 4, "the step must have augmented the rank-2 adapter (room for every new direction)"
    torch.testing.assert_close(weight, expected, atol=IDENTITY[F64], rtol=0)
    plain, _, _ = stepped(kind, "adam", lr)
    assert (plain - expected).abs().max() > 1e3 * IDENTITY[F64], "plain Adam moves the old block differently"


def two_pass(core_optimizer):
    model = adapted("linear", core_optimizer)
    x, y = data(model, "linear")

    def closure():
        loss = 0.5 * ((model(x) - y) ** 2).sum()
        loss.backward()
        return loss

    closure()
    TDLRTIntegrator(model, core_optimizer=core_optimizer).step(1e-2, closure)
    return dense_weight(only_storage(model))


def test_two_pass_step_takes_plain_adams_core_and_factors_is_the_default():
    """The two-pass step has a core gradient for every block at the augmented point, so it has no factor form."""
    torch.testing.assert_close(two_pass("adam_factors"), two_pass("adam"), atol=0, rtol=0)
    assert tdrlt_peft.TuckerAdapterConfig().core_optimizer == "adam_factors"
    assert TDLRTIntegrator(adapted("linear", "adam")).core_optimizer == "adam_factors"
