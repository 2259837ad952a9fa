"""Matrix-layout conv adapters (``conv_layout="matrix"``): ``Mat(ΔW) = U S V^T`` of the (out, in * prod k)
reshape, against dense float64 references; the matrix step; PEFT injection, merge, save / load."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from tdrlt_peft import TDLRTIntegrator, TuckerAdapterConfig, adapter_ranks, count_active_parameters
from tdrlt_peft.layers.conv import Conv
from tdrlt_peft.math.geometry import orthogonality_error

from .helpers import only_storage, tangent_projection
from .test_conv import CASES, random_input
from .tolerances import GRADIENT, IDENTITY, ORTHONORMAL

F64 = torch.float64


def make_matrix_adapter(case: str, r=3, r_max=8, tau=0.0, scale=0.5, seed=0) -> Conv:
    conv_cls, n_in, n_out, k, kwargs, _ = CASES[case]
    torch.manual_seed(seed)
    base = conv_cls(n_in, n_out, k, bias=True, **kwargs).to(F64).requires_grad_(False)
    layer = Conv(base, "default", r=r, r_min=1, r_max=r_max, tau=tau, scale=scale, conv_layout="matrix")
    s = only_storage(layer)
    with torch.no_grad():   # a random full-rank core on the active block
        s.core[:r, :r] = torch.randn(r, r, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    return layer


def active(layer: Conv) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    core, (U, V) = only_storage(layer).active()
    return U.detach().clone(), core.detach().clone(), V.detach().clone()


def dense_output(layer: Conv, x: torch.Tensor, delta_matrix: torch.Tensor) -> torch.Tensor:
    """The base conv with weight W0 + scale * Ten(delta_matrix)."""
    base = layer.get_base_layer()
    weight = base.weight + layer.tdlrt_scale["default"] * delta_matrix.reshape(base.weight.shape)
    return base._conv_forward(x, weight, base.bias)


@pytest.mark.parametrize("case", list(CASES))
def test_forward_equals_dense_conv_with_merged_weight(case):
    layer = make_matrix_adapter(case)
    U, S, V = active(layer)
    x = random_input(case)
    assert layer.mode_sizes() == [layer.out_features, V.shape[0]]
    torch.testing.assert_close(layer(x), dense_output(layer, x, U @ S @ V.T), atol=IDENTITY[F64], rtol=0)
    torch.testing.assert_close(layer.get_delta_weight("default"), 0.5 * (U @ S @ V.T).reshape(
        layer.get_base_layer().weight.shape), atol=IDENTITY[F64], rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_backward_delivers_the_matrix_gradients(case):
    """U.grad = G V, V.grad = G^T U, S.grad = U^T G V with G = dL/dMat(ΔW) (the scale inside G); and dL/dx."""
    layer = make_matrix_adapter(case)
    U, S, V = active(layer)
    x = random_input(case).requires_grad_(True)
    target = torch.randn_like(layer(x))
    ((layer(x) - target) ** 2).sum().backward()
    delta = (U @ S @ V.T).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    ((dense_output(layer, x_ref, delta) - target) ** 2).sum().backward()
    G, r, tol = delta.grad, U.shape[1], GRADIENT[F64]
    s = only_storage(layer)
    torch.testing.assert_close(s.factors[0].grad[:, :r], G @ V, atol=tol, rtol=0)
    torch.testing.assert_close(s.factors[1].grad[:, :r], G.T @ U, atol=tol, rtol=0)
    torch.testing.assert_close(s.core.grad[:r, :r], U.T @ G @ V, atol=tol, rtol=0)
    assert s.core.grad[r:].abs().sum() == 0 and s.factors[0].grad[:, r:].abs().sum() == 0
    torch.testing.assert_close(x.grad, x_ref.grad, atol=tol, rtol=0)


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("case", ["2d", "2d-stride-dilation", "1d", "3d"])
def test_sgd_step_is_the_matrix_tangent_projected_gradient_step(case, batched):
    """tau = 0: U S V^T after the step is Mat(ΔW) - lr P_T(G) (rank 2r), bases orthonormal."""
    layer = make_matrix_adapter(case, r=2, r_max=8)
    U, S, V = active(layer)
    x = random_input(case)
    target = torch.randn_like(layer(x))
    delta = (U @ S @ V.T).requires_grad_(True)
    ((dense_output(layer, x, delta) - target) ** 2).sum().backward()
    ((layer(x) - target) ** 2).sum().backward()
    lr = 0.01
    assert TDLRTIntegrator(layer, core_optimizer="sgd", batched=batched).step(lr)
    expected = U @ S @ V.T - lr * tangent_projection(U, V, delta.grad)
    U1, S1, V1 = active(layer)
    torch.testing.assert_close(U1 @ S1 @ V1.T, expected, atol=IDENTITY[F64], rtol=0)
    assert orthogonality_error(U1) < ORTHONORMAL[F64] and orthogonality_error(V1) < ORTHONORMAL[F64]
    assert U1.shape[1] == V1.shape[1] == 4


class TwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 1)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


def trained_matrix_model(steps: int = 3) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = get_peft_model(TwoConvs(), TuckerAdapterConfig(target_modules=["conv1", "conv2"], r=2, r_max=8,
                                                           tau=0.05, conv_layout="matrix"))
    integrator = TDLRTIntegrator(model)
    x = torch.randn(4, 3, 6, 6)
    for _ in range(steps):
        model(x).square().mean().backward()
        integrator.step(1e-2)
        model.zero_grad()
    return model, x


def test_peft_matrix_layout_merges_saves_and_loads(tmp_path):
    model, x = trained_matrix_model()
    ranks = adapter_ranks(model)
    assert all(len(set(r)) == 1 for r in ranks.values())          # one rank per matrix adapter
    layer = model.base_model.model.conv1
    assert layer.tdlrt_V["default"].shape[0] == 3 * 3 * 3 and layer.conv_layout == "matrix"
    expected = model(x).detach()
    model.save_pretrained(tmp_path)
    torch.manual_seed(1)
    loaded = PeftModel.from_pretrained(TwoConvs(), tmp_path)
    loaded.base_model.model.load_state_dict(model.base_model.model.state_dict(), strict=False)   # same base
    assert loaded.peft_config["default"].conv_layout == "matrix"
    assert adapter_ranks(loaded) == ranks
    torch.testing.assert_close(loaded(x), expected)
    merged = model.merge_and_unload()
    assert isinstance(merged.conv1, nn.Conv2d)
    torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=0)


def test_matrix_layout_budget_counts_out_plus_in_times_kernel():
    """Budget mode prices a direction of a matrix conv adapter at out + in * prod k (+ its core entries)."""
    torch.manual_seed(0)
    model = get_peft_model(TwoConvs(), TuckerAdapterConfig(target_modules=["conv1", "conv2"], r=2, r_max=8,
                                                           conv_layout="matrix", target_params=200))
    ranks = {name.rsplit(".", 1)[-1]: r for name, r in adapter_ranks(model).items()}
    r1, r2 = ranks["conv1"][0], ranks["conv2"][0]
    assert count_active_parameters(model) == r1 * (8 + 27) + r1 * r1 + r2 * (6 + 8) + r2 * r2 <= 200


@pytest.mark.parametrize("kwargs,match", [
    (dict(conv_layout="cp"), r"conv_layout='cp' is invalid: use 'tucker' or 'matrix'"),
    (dict(conv_layout="matrix", factorize_spatial=True), r"conv_layout.*factorize_spatial"),
])
def test_bad_conv_layout_is_refused_with_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TuckerAdapterConfig(target_modules=["conv1"], **kwargs)


def test_second_adapter_with_another_layout_is_refused():
    model = get_peft_model(TwoConvs(), TuckerAdapterConfig(target_modules=["conv1"], r=2, conv_layout="matrix"))
    with pytest.raises(ValueError, match=r"conv_layout='tucker'.*conv_layout='matrix'.*must agree"):
        model.add_adapter("other", TuckerAdapterConfig(target_modules=["conv1"], r=2))
