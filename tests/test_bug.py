"""The paper's two-pass BUG step (``integrator.step(lr, closure)``, ``TDLRTTrainer(integrator="bug")``) against a
dense float64 reference: Û, V̂ span [U, G V] and [V, G^T U]; Ŝ = Û^T (W - λ G) V̂; SVD truncation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tdrlt_peft import TDLRTIntegrator
from tdrlt_peft.layers.adapter import Linear
from tdrlt_peft.math.adam import AdamMoments, adam_direction
from tdrlt_peft.math.geometry import augment_basis, orthogonality_error, truncation_rank

from .helpers import dense_weight, only_storage
from .tolerances import IDENTITY, ORTHONORMAL

F64 = torch.float64


def make_layer(n_out=12, n_in=10, r=3, r_max=8, tau=0.0, scale=1.0, seed=0, zero_core=False):
    torch.manual_seed(seed)
    base = nn.Linear(n_in, n_out, bias=False).to(F64)
    base.weight.requires_grad_(False)
    layer = Linear(base, "default", r=r, r_min=1, r_max=r_max, tau=tau, scale=scale)
    if not zero_core:
        with torch.no_grad():
            layer.tdlrt_S["default"][:r, :r] = torch.randn(r, r, dtype=F64)
    return layer


def batch(n_in=10, n_out=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(7, n_in, dtype=F64, generator=g), torch.randn(7, n_out, dtype=F64, generator=g)


def loss_closure(layer, x, y, calls=None):
    def closure():
        if calls is not None:
            calls.append(1)
        loss = 0.5 * ((layer(x) - y) ** 2).sum()
        loss.backward()
        return loss
    return closure


def dense_state(layer, x, y):
    """(ΔW, U, V, G = dL/dΔW) in float64 by plain autograd on the dense weight."""
    s = only_storage(layer)
    core, (U, V) = s.active()
    delta = dense_weight(s).detach().clone().requires_grad_(True)
    W = layer.base_layer.weight + layer.tdlrt_scale["default"] * delta
    (0.5 * ((x @ W.T - y) ** 2).sum()).backward()
    return delta.detach(), U.detach().clone(), V.detach().clone(), delta.grad


def span(A: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of range(A) (numerical rank)."""
    Q, sigma, _ = torch.linalg.svd(A, full_matrices=False)
    return Q[:, : int((sigma > 1e-12 * sigma[0]).sum())]


def svd_truncate(M: torch.Tensor, tau: float) -> torch.Tensor:
    P, sigma, Rt = torch.linalg.svd(M, full_matrices=False)
    k = truncation_rank(sigma, tau, 1, 10**9)
    return P[:, :k] @ torch.diag(sigma[:k]) @ Rt[:k]


@pytest.mark.parametrize("zero_core", [False, True])
@pytest.mark.parametrize("tau", [0.0, 0.3])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_bug_step_equals_dense_reference(zero_core, tau, scale):
    layer = make_layer(tau=tau, scale=scale, zero_core=zero_core)
    x, y = batch()
    W, U, V, G = dense_state(layer, x, y)
    lr = 0.05
    TDLRTIntegrator(layer, core_optimizer="sgd").step(lr, loss_closure(layer, x, y))
    U_hat, V_hat = span(torch.cat([U, G @ V], 1)), span(torch.cat([V, G.T @ U], 1))
    # Ŝ = Û^T W V̂ - λ Û^T G V̂, expressed densely as Û Ŝ V̂^T, then truncated by the tau rule
    expected = svd_truncate(U_hat.T @ (W - lr * G) @ V_hat, tau)
    expected = U_hat @ expected @ V_hat.T
    s = only_storage(layer)
    torch.testing.assert_close(dense_weight(s), expected, atol=IDENTITY[F64], rtol=0)
    for B in s.active()[1]:
        assert orthogonality_error(B) < ORTHONORMAL[F64]
    if tau == 0.0:
        assert s.ranks == [min(U_hat.shape[1], V_hat.shape[1])] * 2


def test_bug_adds_exactly_the_new_new_block_to_the_parallel_step():
    """W_bug - W_parallel = -λ P_Ũ G P_Ṽ (the block the parallel step leaves zero), tau = 0."""
    x, y = batch()
    lr = 0.1
    results = []
    for closure in (False, True):
        layer = make_layer()
        W, U, V, G = dense_state(layer, x, y)
        layer_closure = loss_closure(layer, x, y)
        if closure:
            TDLRTIntegrator(layer, core_optimizer="sgd").step(lr, layer_closure)
        else:
            layer_closure()
            TDLRTIntegrator(layer, core_optimizer="sgd").step(lr)
        results.append(dense_weight(only_storage(layer)))
    U_new = span(G @ V - U @ (U.T @ G @ V))
    V_new = span(G.T @ U - V @ (V.T @ G.T @ U))
    block = -lr * U_new @ U_new.T @ G @ V_new @ V_new.T
    assert block.abs().max() > 1e-3                      # the block is not trivially zero
    torch.testing.assert_close(results[1] - results[0], block, atol=IDENTITY[F64], rtol=0)


def test_adam_core_update_in_the_augmented_basis():
    """First Adam step (no history): Ĉ = Ĉ0 - lr * m / (sqrt(v) + eps) with m = Ĝ, v = Ĝ^2, Ĝ = Û^T G V̂; the bases
    are augmented with the Adam directions of the K-gradients G V and G^T U (entry-wise, adam.py)."""
    layer = make_layer()
    x, y = batch()
    W, U, V, G = dense_state(layer, x, y)
    lr, eps = 0.01, 1e-8
    TDLRTIntegrator(layer, core_optimizer="adam", eps=eps).step(lr, loss_closure(layer, x, y))
    def first_adam_direction(grad):
        zeros = torch.zeros_like(grad)
        return adam_direction(grad, AdamMoments(zeros, zeros, zeros, zeros), (0.9, 0.999), eps)[0]

    U_hat = torch.cat([U, augment_basis(U, first_adam_direction(G @ V), 3)], 1)
    V_hat = torch.cat([V, augment_basis(V, first_adam_direction(G.T @ U), 3)], 1)
    direction = first_adam_direction(U_hat.T @ G @ V_hat)
    expected = U_hat @ (U_hat.T @ W @ V_hat - lr * direction) @ V_hat.T
    torch.testing.assert_close(dense_weight(only_storage(layer)), expected, atol=IDENTITY[F64], rtol=0)


def test_closure_runs_the_first_pass_too_when_no_gradient_exists():
    layer = make_layer()
    x, y = batch()
    calls = []
    integrator = TDLRTIntegrator(layer, core_optimizer="sgd")
    assert integrator.step(0.1, loss_closure(layer, x, y, calls))
    assert len(calls) == 2
    loss_closure(layer, x, y)()
    calls.clear()
    assert integrator.step(0.1, loss_closure(layer, x, y, calls))
    assert len(calls) == 1


class Head(nn.Module):
    """A TDLRT adapter followed by a trained bias (a parameter the integrator does not own)."""

    def __init__(self):
        super().__init__()
        self.adapter = make_layer()
        self.bias = nn.Parameter(torch.zeros(12, dtype=F64))

    def forward(self, x):
        return self.adapter(x) + self.bias


@pytest.mark.parametrize("zero_grad_in_closure", [False, True])
def test_other_parameters_keep_their_first_pass_gradient(zero_grad_in_closure):
    model = Head()
    x, y = batch()

    def closure():
        if zero_grad_in_closure:
            model.zero_grad()
        loss = 0.5 * ((model(x) - y) ** 2).sum()
        loss.backward()
        return loss

    closure()
    first = model.bias.grad.clone()
    TDLRTIntegrator(model, core_optimizer="sgd").step(0.1, closure)
    torch.testing.assert_close(model.bias.grad, first, atol=0, rtol=0)


def test_exception_in_the_second_pass_restores_every_adapter():
    layer = make_layer()
    x, y = batch()
    loss_closure(layer, x, y)()
    before = {k: v.detach().clone() for k, v in layer.state_dict(keep_vars=True).items()}
    ranks = list(only_storage(layer).ranks)

    def failing():
        raise KeyError("boom")

    with pytest.raises(KeyError):
        TDLRTIntegrator(layer, core_optimizer="sgd").step(0.1, failing)
    s = only_storage(layer)
    assert s.ranks == ranks and s.rank_buffer.tolist() == ranks
    for k, v in layer.state_dict(keep_vars=True).items():
        torch.testing.assert_close(v.detach(), before[k], atol=0, rtol=0)
    assert all(p.grad is None for p in s.parameters())
    layer.train()
    layer(x)   # no IntegratorNotRunError: the failed step left no pending gradient behind


def test_non_finite_second_pass_skips_the_step():
    layer = make_layer()
    x, y = batch()
    loss_closure(layer, x, y)()
    before = dense_weight(only_storage(layer)).detach().clone()

    def nan_closure():
        loss = (layer(x) * float("nan")).sum()
        loss.backward()
        return loss

    integrator = TDLRTIntegrator(layer, core_optimizer="sgd")
    with pytest.warns(UserWarning, match="non-finite"):
        assert not integrator.step(0.1, nan_closure)
    assert integrator.num_skipped == 1
    torch.testing.assert_close(dense_weight(only_storage(layer)), before, atol=0, rtol=0)


def test_narrow_layer_caps_the_augmentation_and_stays_consistent():
    """out = 3 < r_max: both sides share one width at the augmented point, capped by the narrow side."""
    layer = make_layer(n_out=3, n_in=10, r=2, r_max=8)
    x, y = batch(n_in=10, n_out=3)
    W, U, V, G = dense_state(layer, x, y)
    lr = 0.05
    TDLRTIntegrator(layer, core_optimizer="sgd").step(lr, loss_closure(layer, x, y))
    s = only_storage(layer)
    U_new, V_new = s.active()[1]
    assert s.ranks[0] <= 3
    for B in (U_new, V_new):
        assert orthogonality_error(B) < ORTHONORMAL[F64]
    # the result is the Galerkin step in its own bases: Û Û^T (W - λG) V̂ V̂^T restricted to the kept ranks
    result = dense_weight(s)
    torch.testing.assert_close(U_new @ U_new.T @ (W - lr * G) @ V_new @ V_new.T, result,
                               atol=IDENTITY[F64], rtol=0)


def test_bug_converges_on_low_rank_regression_and_finds_the_rank():
    torch.manual_seed(3)
    layer = make_layer(n_out=20, n_in=16, r=2, r_max=12, tau=1e-4, zero_core=True)
    U, _ = torch.linalg.qr(torch.randn(20, 4, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(16, 4, dtype=F64))
    target = U @ torch.diag(torch.tensor([1.0, 0.5, 0.25, 0.125], dtype=F64)) @ V.T
    with torch.no_grad():
        layer.base_layer.weight.zero_()                   # W = ΔW: the target is reachable at rank 4
    x = torch.eye(16, dtype=F64)                          # loss 0.5 ||W - W*||^2: L = 1
    y = x @ target.T
    integrator = TDLRTIntegrator(layer, core_optimizer="sgd")
    losses = []
    for _ in range(40):
        closure = loss_closure(layer, x, y)
        losses.append(closure().item())
        integrator.step(0.5, closure)
    assert all(b <= a * (1 + 1e-12) for a, b in zip(losses, losses[1:]))
    assert losses[-1] < 1e-8 * losses[0]
    assert only_storage(layer).ranks[0] == 4


# --------------------------------------------------------------------- TDLRTTrainer(integrator="bug")
class Regressor(nn.Module):
    """``y = proj(x)`` with a mean-squared-error loss, the Trainer's ``{"loss", "logits"}`` convention."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(10, 12, bias=False).to(F64)

    def forward(self, x, labels=None):
        out = self.proj(x)
        return {"loss": ((out - labels) ** 2).mean(), "logits": out}


def peft_regressor(seed=0):
    from peft import get_peft_model

    from tdrlt_peft import TuckerAdapterConfig

    torch.manual_seed(seed)
    model = Regressor()
    config = TuckerAdapterConfig(target_modules=["proj"], r=2, r_max=6, tau=0.0, core_optimizer="sgd")
    return get_peft_model(model, config)


def regression_rows(n=8):
    x, y = batch()
    x, y = torch.cat([x, x])[:n], torch.cat([y, y])[:n]
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def train_with_trainer(tmp_path, integrator="bug", batch_size=8, accumulation=1, max_grad_norm=0.0, steps=3,
                       lr=0.2):
    from transformers import TrainingArguments

    from tdrlt_peft import TDLRTTrainer

    model = peft_regressor()
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
        max_steps=steps, learning_rate=lr, lr_scheduler_type="constant", optim="sgd", max_grad_norm=max_grad_norm,
        use_cpu=True, report_to="none", save_strategy="no", logging_strategy="no", remove_unused_columns=False,
        seed=0, disable_tqdm=True)
    TDLRTTrainer(model=model, args=args, train_dataset=regression_rows(), integrator=integrator).train()
    return dense_weight(only_storage(model))


def train_by_hand(steps=3, lr=0.2, max_grad_norm=0.0):
    """The reference loop: full batch, integrator.step(lr, closure); clipping as torch's clip_grad_norm_."""
    model = peft_regressor()
    rows = regression_rows()
    x, y = torch.stack([r["x"] for r in rows]), torch.stack([r["labels"] for r in rows])
    integrator = TDLRTIntegrator(model, core_optimizer="sgd")
    clip = {"coefficient": 1.0}

    def closure():
        loss = model(x=x, labels=y)["loss"]
        loss.backward()
        return loss

    def clipped_second_pass():
        loss = closure()
        only_storage(model).core.grad.mul_(clip["coefficient"])
        return loss

    for _ in range(steps):
        closure()
        if max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            clip["coefficient"] = min(1.0, max_grad_norm / (float(norm) + 1e-6))
        integrator.step(lr, clipped_second_pass)
    return dense_weight(only_storage(model))


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05])
def test_trainer_bug_equals_the_hand_written_loop(tmp_path, max_grad_norm):
    expected = train_by_hand(max_grad_norm=max_grad_norm)
    result = train_with_trainer(tmp_path, max_grad_norm=max_grad_norm)
    assert (expected - peft_regressor().base_model.model.proj.get_delta_weight("default")).abs().max() > 1e-3
    torch.testing.assert_close(result, expected, atol=IDENTITY[F64], rtol=0)


def test_trainer_bug_replays_every_accumulated_micro_batch(tmp_path):
    whole = train_with_trainer(tmp_path / "whole", batch_size=8, accumulation=1)
    accumulated = train_with_trainer(tmp_path / "accumulated", batch_size=4, accumulation=2)
    torch.testing.assert_close(accumulated, whole, atol=IDENTITY[F64], rtol=0)


def test_trainer_parallel_differs_from_bug_and_refuses_a_second_callback(tmp_path):
    from transformers import TrainingArguments

    from tdrlt_peft import TDLRTCallback, TDLRTTrainer

    parallel = train_with_trainer(tmp_path / "parallel", integrator="parallel")
    bug = train_with_trainer(tmp_path / "bug")
    assert (parallel - bug).abs().max() > 1e-6
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="remove TDLRTCallback"):
        TDLRTTrainer(model=peft_regressor(), args=args, callbacks=[TDLRTCallback()], integrator="bug")
    with pytest.raises(ValueError, match="integrator must be one of"):
        TDLRTTrainer(model=peft_regressor(), args=args, integrator="projector")


@pytest.mark.parametrize("factorize_spatial", [False, True])
def test_bug_step_on_a_conv_tucker_adapter_equals_dense_reference(factorize_spatial):
    """Tucker: W_new = (W - λ G) x_i Π_i with Π_i the projector on span[U_i, G_Ki] (tau = 0 keeps the exact ranks)."""
    from tdrlt_peft.layers.conv import Conv2d
    from tdrlt_peft.math.tucker import mode_dot, unfold

    torch.manual_seed(0)
    base = nn.Conv2d(6, 8, 3, padding=1, bias=False).to(F64)
    base.weight.requires_grad_(False)
    layer = Conv2d(base, "default", r=2, r_min=1, r_max=5, tau=0.0, scale=1.0, factorize_spatial=factorize_spatial)
    s = only_storage(layer)
    with torch.no_grad():
        s.core[tuple(slice(0, r) for r in s.ranks)] = torch.randn(*s.ranks, dtype=F64)
    x, y = torch.randn(3, 6, 5, 5, dtype=F64), torch.randn(3, 8, 5, 5, dtype=F64)
    core, factors = s.active()
    core, factors = core.detach().clone(), [None if U is None else U.detach().clone() for U in factors]
    delta = dense_weight(s).detach().clone().requires_grad_(True)
    out = nn.functional.conv2d(x, base.weight + delta, padding=1)
    (0.5 * ((out - y) ** 2).sum()).backward()
    G, lr = delta.grad, 0.05

    def closure():
        loss = 0.5 * ((layer(x) - y) ** 2).sum()
        loss.backward()
        return loss

    TDLRTIntegrator(layer, core_optimizer="sgd").step(lr, closure)
    expected = delta.detach() - lr * G
    for i, U in enumerate(factors):
        if U is None:
            continue
        Q = torch.linalg.qr(unfold(core, i).T)[0]            # Mat_i(C)^T = Q_i R_i
        projected = G                                        # G x_{j != i} U_j^T
        for j, V in enumerate(factors):
            if j != i and V is not None:
                projected = mode_dot(projected, V.T, j)
        basis = span(torch.cat([U, unfold(projected, i) @ Q], 1))
        expected = mode_dot(expected, basis @ basis.T, i)
    torch.testing.assert_close(dense_weight(s), expected, atol=IDENTITY[F64], rtol=0)


class RecordingDropout(nn.Module):
    """Dropout that keeps every mask it draws."""

    def __init__(self):
        super().__init__()
        self.masks = []

    def forward(self, x):
        mask = (torch.rand_like(x) > 0.5).to(x.dtype)
        self.masks.append(mask)
        return x * mask * 2


def test_trainer_bug_replays_with_the_same_dropout_masks(tmp_path):
    from transformers import TrainingArguments

    from tdrlt_peft import TDLRTTrainer

    model = peft_regressor()
    dropout = RecordingDropout()
    inner = model.base_model.model
    inner.forward = lambda x, labels=None: Regressor.forward(inner, dropout(x), labels)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2,
        learning_rate=0.1, lr_scheduler_type="constant", optim="sgd", max_grad_norm=0.0, use_cpu=True,
        report_to="none", save_strategy="no", logging_strategy="no", remove_unused_columns=False, seed=0,
        disable_tqdm=True)
    TDLRTTrainer(model=model, args=args, train_dataset=regression_rows(), integrator="bug").train()
    # per optimizer step: 2 micro-batches, then their replay with the same masks
    assert len(dropout.masks) == 8
    for step in (0, 4):
        first_pass, replay = dropout.masks[step:step + 2], dropout.masks[step + 2:step + 4]
        for a, b in zip(first_pass, replay):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(dropout.masks[0], dropout.masks[4])   # fresh masks at the next step
