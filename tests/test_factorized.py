"""Factorized layers (no dense weight): initialisation, forward/backward, integrator training, parameter counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tdrlt_peft import TDLRTIntegrator, adapter_ranks, count_active_parameters
from tdrlt_peft.layers.factorized import FactorizedConv, FactorizedLinear, factorize, factorized_from
from tdrlt_peft.math.geometry import orthogonality_error

from .helpers import only_storage, tangent_projection
from .tolerances import GRADIENT, IDENTITY, ORTHONORMAL
from .tucker_reference import numpy_hosvd_truncation

F64 = torch.float64


def conv(n_in=6, n_out=10, k=3, seed=0, **kwargs):
    torch.manual_seed(seed)
    return nn.Conv2d(n_in, n_out, k, **kwargs).to(F64)


def low_rank_conv_weight(seed=0):
    """A (10, 6, 3, 3) kernel with multilinear ranks (4, 3, 3, 3) plus small noise: HOSVD truncation is visible."""
    g = torch.Generator().manual_seed(seed)
    W = torch.einsum("abcd,ia,jb->ijcd", torch.randn(4, 3, 3, 3, generator=g, dtype=F64),
                     torch.randn(10, 4, generator=g, dtype=F64), torch.randn(6, 3, generator=g, dtype=F64))
    return W + 1e-3 * torch.randn(W.shape, generator=g, dtype=F64)


@pytest.mark.parametrize("factorize_spatial", [False, True])
@pytest.mark.parametrize("tau", [0.0, 1e-3, 0.1])
def test_init_from_weights_is_the_tau_truncated_hosvd(tau, factorize_spatial):
    module = conv()
    with torch.no_grad():
        module.weight.copy_(low_rank_conv_weight())
    layer = factorized_from(module, init="weights", tau=tau, r_max=16, factorize_spatial=factorize_spatial)
    W = module.weight.detach()
    modes = [0, 1, 2, 3] if factorize_spatial else [0, 1]
    expected, ranks = numpy_hosvd_truncation(W.numpy(), modes, tau)
    assert [layer.ranks[i] for i in modes] == ranks
    np.testing.assert_allclose(layer.weight.detach().numpy(), expected, atol=IDENTITY[F64], rtol=0)
    # the truncation tolerance: ||W - Ŵ|| <= sqrt(#modes) tau ||W||
    error = torch.linalg.norm(layer.weight - W)
    assert error <= np.sqrt(len(modes)) * tau * torch.linalg.norm(W) + IDENTITY[F64]
    torch.testing.assert_close(layer.bias, module.bias)


@pytest.mark.parametrize("tau", [0.0, 0.05])
def test_linear_and_matrix_conv_init_from_weights_is_the_truncated_svd(tau):
    torch.manual_seed(0)
    linear = nn.Linear(9, 7).to(F64)
    for module, layout in [(linear, "tucker"), (conv(), "matrix")]:
        layer = factorized_from(module, init="weights", tau=tau, r_max=16, layout=layout)
        W = module.weight.detach().reshape(module.weight.shape[0], -1)
        sigma = torch.linalg.svdvals(W)
        k = layer.ranks[0]
        assert torch.linalg.norm(sigma[k:]) <= tau * torch.linalg.norm(sigma) + IDENTITY[F64]
        assert k == 1 or torch.linalg.norm(sigma[k - 1:]) > tau * torch.linalg.norm(sigma)
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        best = U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]   # Eckart-Young: the best rank-k approximation
        torch.testing.assert_close(layer.weight.reshape(W.shape), best, atol=IDENTITY[F64], rtol=0)


def test_random_init_keeps_the_module_scale_with_orthonormal_factors():
    module = conv(n_in=16, n_out=32)
    layer = factorized_from(module, init="random", r=5, r_max=12)
    assert layer.ranks == [5, 5, 3, 3]
    torch.testing.assert_close(torch.linalg.norm(layer.weight), torch.linalg.norm(module.weight.detach()))
    for U in layer.active()[1]:
        if U is not None:
            assert orthogonality_error(U.detach()) < ORTHONORMAL[F64]


@pytest.mark.parametrize("train_with", ["integrator", "optimizer"])
@pytest.mark.parametrize("layout,factorize_spatial", [("tucker", False), ("tucker", True), ("matrix", False)])
def test_conv_forward_equals_dense_conv_with_rebuilt_weight(layout, factorize_spatial, train_with):
    module = conv(stride=2, padding=1, padding_mode="circular")
    layer = factorized_from(module, r=3, r_max=8, layout=layout, factorize_spatial=factorize_spatial,
                            train_with=train_with)
    x = torch.randn(2, 6, 9, 9, dtype=F64)
    expected = module._conv_forward(x, layer.weight, layer.bias)
    torch.testing.assert_close(layer(x), expected, atol=IDENTITY[F64], rtol=0)


def test_matrix_conv_backward_equals_dense_autograd():
    """Reshaped kernel Mat(W) = U S V^T: G_K = G V, G_L = G^T U, G_S = U^T G V with G = dL/dMat(W)."""
    module = conv(padding=1, dilation=(1, 2))
    layer = factorized_from(module, r=3, r_max=8, layout="matrix")
    x = torch.randn(2, 6, 8, 9, dtype=F64, requires_grad=True)
    target = torch.randn_like(layer(x))
    ((layer(x) - target) ** 2).sum().backward()
    U, V = (t.detach() for t in layer.active()[1])
    W = layer.weight.detach().reshape(10, -1).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    ((module._conv_forward(x_ref, W.reshape(10, 6, 3, 3), layer.bias) - target) ** 2).sum().backward()
    G, tol = W.grad, GRADIENT[F64]
    s = only_storage(layer)
    torch.testing.assert_close(s.factors[0].grad[:, :3], G @ V, atol=tol, rtol=0)
    torch.testing.assert_close(s.factors[1].grad[:, :3], G.T @ U, atol=tol, rtol=0)
    torch.testing.assert_close(s.core.grad[:3, :3], U.T @ G @ V, atol=tol, rtol=0)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=tol, rtol=0)


def test_matrix_conv_sgd_step_is_tangent_projected_gradient_step():
    module = conv(padding=1)
    layer = factorized_from(module, r=3, r_max=8, tau=0.0, layout="matrix")
    W_before = layer.weight.detach().reshape(10, -1).clone()
    U, V = (t.detach().clone() for t in layer.active()[1])
    x = torch.randn(4, 6, 7, 7, dtype=F64)
    target = torch.randn_like(layer(x))
    W = W_before.clone().requires_grad_(True)
    ((module._conv_forward(x, W.reshape(10, 6, 3, 3), layer.bias) - target) ** 2).sum().backward()
    ((layer(x) - target) ** 2).sum().backward()
    assert TDLRTIntegrator(layer, core_optimizer="sgd").step(0.01)
    expected = W_before - 0.01 * tangent_projection(U, V, W.grad)
    torch.testing.assert_close(layer.weight.reshape(10, -1), expected, atol=IDENTITY[F64], rtol=0)
    assert adapter_ranks(layer)[""] == (6, 6)


def test_bias_is_left_to_the_user_optimizer_and_counts_are_factorized_sizes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3), nn.Flatten(), nn.Linear(8, 4))
    factorize(model, target_modules=["0", "2"], r=4, r_max=10)
    integrator = TDLRTIntegrator(model)
    others = integrator.other_trainable_parameters()
    assert {id(p) for p in others} == {id(model[0].bias), id(model[2].bias), id(model[4].weight), id(model[4].bias)}
    # conv 0: ranks (4, 3) (in = 3); conv 2: ranks (4, 4); spatial 3x3 unfactorized
    tucker = (16 * 4 + 3 * 3 + 4 * 3 * 9) + (8 * 4 + 16 * 4 + 4 * 4 * 9)
    assert count_active_parameters(model) == tucker + 16 + 8 + 8 * 4 + 4


def test_fixed_rank_layers_train_with_ordinary_autograd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Flatten(), nn.Linear(16 * 4 * 4, 4))
    factorize(model, r={"0": [4, 2], "2": 3}, train_with="optimizer")
    assert isinstance(model[0], FactorizedConv) and isinstance(model[2], FactorizedLinear)
    assert model[0].ranks == [4, 2, 3, 3] and model[2].ranks == [3, 3]
    # no TDLRT storages, every parameter counted at its size (the ranks are the storage)
    with pytest.raises(ValueError, match="found no TDLRT adapters"):
        TDLRTIntegrator(model)
    assert count_active_parameters(model) == sum(p.numel() for p in model.parameters())
    x = torch.randn(2, 3, 6, 6)
    model(x).sum().backward()
    U1 = model[0].factors["U1"]
    # ordinary dL/dU_1: finite difference along a random direction
    direction = torch.randn_like(U1)
    with torch.no_grad():
        eps = 1e-3
        U1 += eps * direction
        up = model(x).sum()
        U1 -= 2 * eps * direction
        down = model(x).sum()
        U1 += eps * direction
    torch.testing.assert_close((up - down) / (2 * eps), (U1.grad * direction).sum(), rtol=1e-2, atol=1e-3)


def test_state_dict_round_trip_after_rank_changes():
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Conv2d(3, 12, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12 * 4 * 4, 5))  # noqa: E731
    model = factorize(make(), r=3, r_max=10, tau=0.05)
    integrator = TDLRTIntegrator(model)
    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 5, (16,))
    start = adapter_ranks(model)
    for _ in range(5):
        nn.functional.cross_entropy(model(x), y).backward()
        integrator.step(0.1)
    assert adapter_ranks(model) != start
    restored = factorize(make(), r=3, r_max=10, tau=0.05)
    restored.load_state_dict(model.state_dict())
    assert adapter_ranks(restored) == adapter_ranks(model)
    torch.testing.assert_close(restored(x), model(x), atol=0, rtol=0)


def test_grouped_convolution_is_refused_with_its_name():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=4))
    with pytest.raises(ValueError, match=r"'0'.*groups=4"):
        factorize(model)


def test_training_from_scratch_on_digits_learns_and_compresses():
    """A factorized CNN on sklearn's 8x8 digits: TDLRT reaches a useful accuracy with few conv parameters."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 10))
    dense_conv = sum(m.weight.numel() for m in (model[0], model[2]))
    factorize(model, target_modules=["2"], r=12, r_max=16, tau=0.3)   # the truncation lowers the ranks
    integrator = TDLRTIntegrator(model, core_optimizer="adam")
    optimizer = torch.optim.Adam(integrator.other_trainable_parameters(), lr=1e-2)
    train, test = slice(0, 1400), slice(1400, None)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        for batch in torch.randperm(1400, generator=g).split(64):
            nn.functional.cross_entropy(model(x[train][batch]), y[train][batch]).backward()
            integrator.step(1e-2)
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
    accuracy = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    r_out, r_in = adapter_ranks(model)["2"]
    factorized_conv = 16 * 9 + 32 * r_out + 16 * r_in + r_out * r_in * 9
    assert accuracy > 0.85   # dense: 0.90 with the same recipe
    assert r_out < 12 and r_in < 12
    assert factorized_conv < 0.25 * dense_conv


@pytest.mark.slow
def test_compression_benchmark_smoke(tmp_path):
    """``python -m benchmarks.compression --smoke`` runs end to end (needs the Fashion-MNIST Debian package)."""
    from benchmarks.compression import BenchmarkError
    from benchmarks.compression.__main__ import main
    from benchmarks.compression.data import find_data_dir

    try:
        find_data_dir(None)
    except BenchmarkError:
        pytest.fail("Fashion-MNIST is not installed: apt-get install -y dataset-fashion-mnist (README set-up)")
    assert main(["--smoke", "--workers", "1", "--networks", "lenet5", "--output-dir", str(tmp_path)]) == 0
    table = (tmp_path / "results.md").read_text()
    assert "TDLRT Tucker (tau=0.3)" in table and "Tucker fixed-rank GD" in table
    assert (tmp_path / "accuracy_vs_compression.png").stat().st_size > 0
