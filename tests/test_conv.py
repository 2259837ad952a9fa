"""Tucker adapters for convolutions: forward, TDLRT backward and step against dense float64 references; PEFT."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from tdrlt_peft import TDLRTIntegrator, TuckerAdapterConfig, adapter_ranks
from tdrlt_peft.layers.conv import Conv, Conv2d
from tdrlt_peft.math.geometry import orthogonality_error

from .helpers import only_storage
from .tolerances import GRADIENT, IDENTITY, ORTHONORMAL
from .tucker_reference import core_gradient, dense, k_gradient, numpy_hosvd_truncation, tangent_projection

F64 = torch.float64

# (conv class, in, out, kernel, conv kwargs, input spatial size)
CASES = {
    "2d": (nn.Conv2d, 5, 7, 3, dict(padding=1), (9, 8)),
    "2d-stride-dilation": (nn.Conv2d, 5, 7, 3, dict(stride=2, dilation=2), (11, 10)),
    "2d-reflect": (nn.Conv2d, 4, 6, 3, dict(padding=1, padding_mode="reflect"), (7, 7)),
    "2d-same-even-kernel": (nn.Conv2d, 4, 6, (2, 4), dict(padding="same"), (7, 6)),
    "2d-1x1": (nn.Conv2d, 3, 16, 1, dict(), (5, 5)),
    "1d": (nn.Conv1d, 5, 7, 3, dict(padding=2, stride=2), (12,)),
    "3d": (nn.Conv3d, 3, 5, 3, dict(padding=1), (5, 4, 5)),
}


def make_conv_adapter(case: str, factorize_spatial=False, r=3, r_max=8, tau=0.0, scale=1.0, seed=0):
    conv_cls, n_in, n_out, k, kwargs, _ = CASES[case]
    torch.manual_seed(seed)
    base = conv_cls(n_in, n_out, k, bias=True, **kwargs).to(F64)
    base.requires_grad_(False)
    return Conv(base, "default", r=r, r_min=1, r_max=r_max, tau=tau, scale=scale,
                factorize_spatial=factorize_spatial)


def set_random_core(layer, seed=1):
    """A random core on the active slices: every Mat_i(C) has full row rank (needed by the identities)."""
    s = only_storage(layer)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        s.core[tuple(slice(0, r) for r in s.ranks)] = torch.randn(s.ranks, generator=g, dtype=F64)


def active(layer):
    core, factors = only_storage(layer).active()
    return core.detach().clone(), [None if U is None else U.detach().clone() for U in factors]


def random_input(case: str, batch=3, seed=2):
    conv_cls, n_in, *_, size = CASES[case]
    return torch.randn(batch, n_in, *size, generator=torch.Generator().manual_seed(seed), dtype=F64)


def dense_output(layer, x, delta):
    """The base conv with weight W0 + scale * delta (same stride/padding/dilation/padding mode)."""
    base = layer.get_base_layer()
    weight = base.weight + layer.tdlrt_scale["default"] * delta
    return base._conv_forward(x, weight, base.bias)


@pytest.mark.parametrize("factorize_spatial", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_equals_dense_conv_with_merged_weight(case, factorize_spatial):
    layer = make_conv_adapter(case, factorize_spatial, scale=0.5)
    set_random_core(layer)
    x = random_input(case)
    expected = dense_output(layer, x, dense(*active(layer)))
    torch.testing.assert_close(layer(x), expected, atol=IDENTITY[F64], rtol=0)


@pytest.mark.parametrize("factorize_spatial", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_backward_equals_dense_autograd(case, factorize_spatial):
    """Core gradient G x_i U_i^T and K-gradients Mat_i(G x_{j != i} U_j^T) Q_i from G = dL/dΔW; and dL/dx."""
    layer = make_conv_adapter(case, factorize_spatial, r=5, scale=0.5)   # 1x1: r_1 = 5 > r_2 = 3 = q_1
    set_random_core(layer)
    core, factors = active(layer)
    x = random_input(case).requires_grad_(True)
    target = torch.randn_like(layer(x))
    ((layer(x) - target) ** 2).sum().backward()

    delta = dense(core, factors).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    ((dense_output(layer, x_ref, delta) - target) ** 2).sum().backward()
    G = delta.grad
    s, tol = only_storage(layer), GRADIENT[F64]
    ranks = s.ranks
    torch.testing.assert_close(s.core.grad[tuple(slice(0, r) for r in ranks)], core_gradient(G, factors),
                               atol=tol, rtol=0)
    for i, U in enumerate(s.factors):
        if U is None:
            continue
        G_K = k_gradient(G, core, factors, i)
        torch.testing.assert_close(U.grad[:, : G_K.shape[1]], G_K, atol=tol, rtol=0)
        assert U.grad[:, G_K.shape[1]:].abs().sum() == 0   # storage past q_i receives nothing
    torch.testing.assert_close(x.grad, x_ref.grad, atol=tol, rtol=0)


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("case,factorize_spatial", [("2d", False), ("2d", True), ("2d-stride-dilation", False),
                                                    ("1d", True), ("3d", False)])
def test_sgd_step_is_tucker_tangent_projected_gradient_step(case, factorize_spatial, scale, batched):
    """tau = 0, no cap binding: Ĉ x Û = ΔW - lr P_T(G) through TDLRTIntegrator(core_optimizer="sgd").step.

    The step must use the very Q_i of the forward's K-gradients, on the batched and the per-adapter path."""
    layer = make_conv_adapter(case, factorize_spatial, r=2, r_max=8, scale=scale)
    set_random_core(layer)
    core, factors = active(layer)
    x = random_input(case)
    target = torch.randn_like(layer(x))
    delta = dense(core, factors).requires_grad_(True)
    ((dense_output(layer, x, delta) - target) ** 2).sum().backward()
    ((layer(x) - target) ** 2).sum().backward()
    lr = 0.01
    assert TDLRTIntegrator(layer, core_optimizer="sgd", batched=batched).step(lr)
    expected = dense(core, factors) - lr * tangent_projection(core, factors, delta.grad)
    torch.testing.assert_close(dense(*active(layer)), expected, atol=IDENTITY[F64], rtol=0)
    for U in active(layer)[1]:
        if U is not None:
            assert orthogonality_error(U) < ORTHONORMAL[F64]


@pytest.mark.parametrize("tau", [0.02, 0.03, 0.04])   # ranks 2 -> mixed ranks between 2 and 4 per mode
@pytest.mark.parametrize("factorize_spatial", [False, True])
def test_truncation_is_hosvd_of_the_step_with_tau(tau, factorize_spatial):
    """tau > 0: the new ΔW and ranks are the per-mode HOSVD truncation (numpy) of ΔW - lr P_T(G)."""
    layer = make_conv_adapter("2d", factorize_spatial, r=2, r_max=8, tau=tau)
    set_random_core(layer)
    core, factors = active(layer)
    x = random_input("2d")
    target = torch.randn_like(layer(x))
    delta = dense(core, factors).requires_grad_(True)
    ((dense_output(layer, x, delta) - target) ** 2).sum().backward()
    ((layer(x) - target) ** 2).sum().backward()
    lr = 0.05
    TDLRTIntegrator(layer, core_optimizer="sgd").step(lr)
    stepped = (dense(core, factors) - lr * tangent_projection(core, factors, delta.grad)).numpy()
    modes = [i for i, U in enumerate(factors) if U is not None]
    expected, ranks = numpy_hosvd_truncation(stepped, modes, tau)
    assert list(adapter_ranks(layer)[""]) == ranks
    np.testing.assert_allclose(dense(*active(layer)).numpy(), expected, atol=IDENTITY[F64], rtol=0)


def test_one_by_one_conv_rank_bounded_by_singular_values():
    """1x1 kernel: Mat_1(Ĉ) has at most r̂_2 singular values, so r_1 <= r̂_2 after a step (Q_1 is (3, 3))."""
    layer = make_conv_adapter("2d-1x1", r=8, r_max=16, tau=0.0)   # in = 3: ranks (8, 3), core (8, 3, 1, 1)
    assert only_storage(layer).ranks == [8, 3, 1, 1]
    x = random_input("2d-1x1")
    for _ in range(2):
        ((layer(x) - 1.0) ** 2).sum().backward()
        assert TDLRTIntegrator(layer, core_optimizer="sgd").step(0.01)
        r_out, r_in = adapter_ranks(layer)[""]
        assert r_in <= 3 and r_out <= r_in


def test_grouped_convolution_is_refused_with_its_name():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Flatten())
    with pytest.raises(ValueError, match=r"'0'.*groups=2.*exclude_modules"):
        get_peft_model(model, TuckerAdapterConfig(target_modules=["0"], r=2))


# --------------------------------------------------------------------- PEFT integration
class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 12, 3, stride=2)
        self.head = nn.Linear(12 * 3 * 3, 5)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        return self.head(torch.relu(self.conv2(x)).flatten(1))


def trained_cnn_adapter(factorize_spatial: bool):
    torch.manual_seed(0)
    config = TuckerAdapterConfig(target_modules=["conv1", "conv2", "head"], r=3, r_max=8, tau=0.05,
                                 factorize_spatial=factorize_spatial)
    model = get_peft_model(SmallCNN(), config)
    integrator = TDLRTIntegrator(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 8, 8, generator=g)
    y = torch.randint(0, 5, (16,), generator=g)
    start = adapter_ranks(model)
    for _ in range(6):
        nn.functional.cross_entropy(model(x), y).backward()
        integrator.step(0.05)
    assert adapter_ranks(model) != start   # the saved adapter must resize on load
    return model, x


@pytest.mark.integration
@pytest.mark.parametrize("factorize_spatial", [False, True])
def test_save_load_after_rank_changes_gives_identical_outputs(tmp_path, factorize_spatial):
    model, x = trained_cnn_adapter(factorize_spatial)
    model.eval()
    expected = model(x)
    model.save_pretrained(tmp_path)
    torch.manual_seed(123)
    loaded = PeftModel.from_pretrained(SmallCNN(), tmp_path)
    base_state = {k: v for k, v in model.base_model.model.state_dict().items() if "tdlrt_" not in k}
    loaded.base_model.model.load_state_dict(base_state, strict=False)   # same base weights as the trained model
    loaded.eval()
    assert adapter_ranks(loaded) == adapter_ranks(model)
    assert isinstance(loaded.base_model.model.conv1, Conv2d)
    torch.testing.assert_close(loaded(x), expected, atol=1e-6, rtol=0)


@pytest.mark.integration
def test_merge_equals_unmerged_output():
    model, x = trained_cnn_adapter(False)
    model.eval()
    unmerged = model(x)
    merged = model.merge_and_unload()
    assert not any("tdlrt_" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(merged(x), unmerged, atol=1e-5, rtol=0)


@pytest.mark.integration
def test_trainable_parameter_count_is_the_tucker_size():
    model, _ = trained_cnn_adapter(False)
    total = 0
    for name, ranks in adapter_ranks(model).items():
        module = model.get_submodule(name)
        sizes = module.get_base_layer().weight.shape
        spatial = int(np.prod(sizes[2:])) if len(sizes) > 2 else 1
        total += sizes[0] * ranks[0] + sizes[1] * ranks[1] + ranks[0] * ranks[1] * spatial
    assert model.get_nb_trainable_parameters()[0] == total
