"""Property tests of the rank-adaptive step (hypothesis, float64) and long runs of the integrator (float32).

For random shapes (matrices and 3-/4-way Tucker tensors), ranks, rank bounds, tau, learning rates and gradients:
ranks stay within their bounds, factors stay orthonormal, the truncation error stays within tau per mode, tau = 0
with no binding cap changes nothing but the step, and a step is deterministic.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from peft import get_peft_model
from torch import nn

from tdrlt_peft import TDLRTIntegrator, TuckerAdapterConfig, adapter_ranks
from tdrlt_peft.layers.inventory import iter_storages
from tdrlt_peft.math import engine
from tdrlt_peft.math.adam import AdamMoments
from tdrlt_peft.math.engine import RankBounds
from tdrlt_peft.math.geometry import orthogonality_error, orthonormalize, random_orthonormal
from tdrlt_peft.math.tucker import multi_mode_dot, project_to_core, tucker_to_tensor, unfold

from .helpers import MLP, tangent_projection, train_steps
from .tolerances import IDENTITY, ORTHONORMAL, TRUNCATION_SLACK

F64 = torch.float64
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)


@st.composite
def step_problems(draw, roomy: bool = False):
    """A random point (core, orthonormal factors), dense gradient G = dL/dW, rank bounds and step settings.

    ``roomy``: storage and r_max at least twice the ranks and r_min = 1, so that no cap binds and tau decides."""
    matrix = draw(st.booleans())
    d = 2 if matrix else draw(st.sampled_from([3, 4]))
    sizes = [draw(st.integers(4 if roomy else 2, 9 if matrix else 5)) for _ in range(d)]
    r_max = 9 if roomy else draw(st.integers(2, 8))
    r_min = 1 if roomy else draw(st.integers(1, r_max))
    widths = [min(r_max, n) for n in sizes]          # stored factor widths R_i
    limits = [w // 2 if roomy else w for w in widths]
    if matrix:
        r = draw(st.integers(1, min(limits)))
        ranks = [r, r]
    else:
        ranks = [draw(st.integers(1, w)) for w in limits]
    tau = draw(st.floats(0.02 if roomy else 0.0, 0.6))
    return dict(matrix=matrix, sizes=sizes, ranks=ranks, widths=widths, bounds=RankBounds(tau, r_min, r_max),
                lr=draw(st.floats(0.01, 2.0)), adam=draw(st.booleans()), decay=draw(st.floats(0.1, 1.0)),
                seed=draw(st.integers(0, 2**31 - 1)))


def pad(tensor, shape):
    out = tensor.new_zeros(shape)
    out[tuple(slice(0, s) for s in tensor.shape)] = tensor
    return out


def build_step(problem):
    """Tensors of the problem and the step's inputs ``(core, factors, G_C, G_K)`` as the layers deliver them."""
    g = torch.Generator().manual_seed(problem["seed"])
    factors = [random_orthonormal(n, r, F64, generator=g) for n, r in zip(problem["sizes"], problem["ranks"])]
    core = torch.randn(problem["ranks"], dtype=F64, generator=g)
    for i, r in enumerate(problem["ranks"]):     # decaying spectra (decay ** j along every mode), as trained cores
        shape = [1] * core.dim()
        shape[i] = r
        core = core * (problem["decay"] ** torch.arange(r, dtype=F64)).reshape(shape)
    G = torch.randn(problem["sizes"], dtype=F64, generator=g)
    core_grad = project_to_core(G, factors)                          # G x_j U_j^T
    widths = problem["widths"]
    ranks = torch.tensor([problem["ranks"]])
    qs = engine.row_space_bases(pad(core, widths)[None], ranks, [True] * core.dim(), problem["matrix"])
    # G_Ki = Mat_i(G x_{j != i} U_j^T) Q_i  (Q = I for a matrix), in the padded index space of the storage
    k_grads = []
    for i, (Q, w) in enumerate(zip(qs, widths)):
        others = [n if j == i else widths[j] for j, n in enumerate(problem["sizes"])]
        partial = unfold(pad(multi_mode_dot(G, factors, skip=i, transpose=True), others), i)
        # a matrix's K-gradient columns are the other side's basis; a Tucker mode's are Q_i's
        k = partial[:, : min(w, widths[1 - i])] if Q is None else partial @ Q[0]
        k_grads.append(pad(k, (k.shape[0], w))[None])
    moments = None
    if problem["adam"]:
        shape = problem["ranks"]
        moments = AdamMoments(torch.randn(shape, dtype=F64, generator=g), torch.rand(shape, dtype=F64, generator=g),
                              torch.full(shape, 0.5, dtype=F64), torch.full(shape, 0.5, dtype=F64))
    group = engine.Group(core=pad(core, widths)[None], factors=[pad(U, (U.shape[0], w))[None] for U, w in
                                                                zip(factors, widths)],
                         ranks=ranks, matrix=problem["matrix"],
                         moments=None if moments is None else AdamMoments(*(pad(m, widths)[None]
                                                                            for m in moments.tensors())))
    return factors, core, G, pad(core_grad, widths)[None], k_grads, group


class ActiveProposal:
    """The engine's proposal of one adapter, as active slices: ranks, (P, sigma) per mode, Ĉ and Û."""

    def __init__(self, proposal):
        self.ranks = proposal.ranks[0].tolist()
        augmented = proposal.augmented[0].tolist()
        self.core = proposal.core[0][tuple(slice(0, r) for r in augmented)]
        self.bases = [U[0, :, :r] for U, r in zip(proposal.bases, augmented)]
        self.svds = [(P[0], values[0, :r].clamp_min(0).sqrt().sort(descending=True).values)
                     for (values, P), r in zip(proposal.eig, augmented)]


def run_step(problem):
    factors, core, G, core_grad, k_grads, group = build_step(problem)
    adam = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0} if group.moments is not None else None
    b = problem["bounds"]
    caps = problem["widths"]
    bounds = engine.Bounds(torch.tensor([b.tau], dtype=F64), torch.tensor([b.r_min]), torch.tensor([b.r_max]),
                           torch.tensor([b.absolute]), torch.tensor([caps]))
    proposal = engine.propose(group, core_grad, k_grads, problem["lr"], bounds, adam)
    new = engine.apply(proposal, proposal.ranks)
    active = ActiveProposal(proposal)
    new_core = new.core[0][tuple(slice(0, r) for r in active.ranks)]
    new_factors = [U[0, :, :r] for U, r in zip(new.factors, active.ranks)]
    return active, new_core, new_factors, (core, factors, G)


def tails(proposal) -> list[float]:
    """Per mode: the discarded part sqrt(sum_{j >= k_i} sigma_j^2) of Mat_i(Ĉ)."""
    return [math.sqrt(float((sigma[k:] ** 2).sum())) for (_, sigma), k in zip(proposal.svds, proposal.ranks)]


@PROPERTY_SETTINGS
@given(step_problems())
def test_ranks_within_bounds_and_factors_orthonormal(problem):
    proposal, new_core, new_factors, _ = run_step(problem)
    bounds = problem["bounds"]
    assert list(new_core.shape) == proposal.ranks
    for i, (U, k) in enumerate(zip(new_factors, proposal.ranks)):
        cap = min(bounds.r_max, problem["widths"][i], proposal.svds[i][1].numel())
        assert 1 <= k <= cap, (i, k, cap)
        assert k >= min(bounds.r_min, *[min(bounds.r_max, w, s[1].numel())
                                        for w, s in zip(problem["widths"], proposal.svds)])
        assert U.shape == (problem["sizes"][i], k)
        assert orthogonality_error(U) <= ORTHONORMAL[F64]
    if problem["matrix"]:
        assert proposal.ranks[0] == proposal.ranks[1]


@PROPERTY_SETTINGS
@given(st.one_of(step_problems(), step_problems(roomy=True)))
def test_truncation_error_within_tau(problem):
    """Per mode ||Mat_i(Ĉ) - P_k P_k^T Mat_i(Ĉ)||_F <= tau ||Ĉ||_F unless a rank cap binds, and the represented
    weight moves by at most the HOSVD bound sqrt(sum_i tail_i^2) from Ĉ x Û."""
    proposal, new_core, new_factors, _ = run_step(problem)
    bounds = problem["bounds"]
    norm = float(torch.linalg.norm(proposal.core))
    slack = TRUNCATION_SLACK[F64] * max(norm, 1.0)
    caps = [min(bounds.r_max, width, sigma.numel()) for (_, sigma), width in zip(proposal.svds, problem["widths"])]
    checked = 0
    for i, (k, tail) in enumerate(zip(proposal.ranks, tails(proposal))):
        # a matrix's two modes share one rank, so either mode's cap binds both
        if k < (min(caps) if problem["matrix"] else caps[i]):
            assert tail <= bounds.tau * norm + slack, (tail, bounds.tau * norm)
            checked += 1
    event(f"modes checked against tau: {checked}")
    augmented = tucker_to_tensor(proposal.core, proposal.bases)
    moved = float(torch.linalg.norm(tucker_to_tensor(new_core, new_factors) - augmented))
    assert moved <= math.sqrt(sum(t * t for t in tails(proposal))) + slack


@PROPERTY_SETTINGS
@given(step_problems())
def test_tau_zero_without_binding_cap_keeps_the_step_exact(problem):
    """tau = 0: the new weight is Ĉ x Û (nothing truncated) when no cap binds; for a matrix SGD step whose
    augmentation is not cut by the storage, that is W - lr P_T(G)."""
    problem = {**problem, "bounds": RankBounds(0.0, 1, problem["bounds"].r_max)}
    proposal, new_core, new_factors, (core, factors, G) = run_step(problem)
    new_weight = tucker_to_tensor(new_core, new_factors)
    scale = max(float(new_weight.abs().max()), 1.0)
    if all(t <= TRUNCATION_SLACK[F64] for t in tails(proposal)):
        torch.testing.assert_close(new_weight, tucker_to_tensor(proposal.core, proposal.bases),
                                   atol=IDENTITY[F64] * scale, rtol=0)
    r = problem["ranks"][0]
    room = all(min(w, n) >= 2 * r for w, n in zip(problem["widths"], problem["sizes"]))
    if problem["matrix"] and not problem["adam"] and room:
        U, V = factors
        expected = U @ core @ V.T - problem["lr"] * tangent_projection(U, V, G)
        torch.testing.assert_close(tucker_to_tensor(proposal.core, proposal.bases), expected,
                                   atol=IDENTITY[F64] * scale, rtol=0)


@PROPERTY_SETTINGS
@given(step_problems())
def test_step_is_deterministic(problem):
    first, second = run_step(problem), run_step(problem)
    assert first[0].ranks == second[0].ranks
    assert torch.equal(first[1], second[1])
    assert all(torch.equal(a, b) for a, b in zip(first[2], second[2]))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(2, 40), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_reorthonormalization_keeps_coordinates(n, r, seed):
    """orthonormalize(U) = Q R with diag(R) >= 0, so a nearly orthonormal U gives R = I + O(drift): the core
    (and the Adam moments beside it) keep their signs when a basis is re-orthonormalised."""
    r = min(r, n)
    g = torch.Generator().manual_seed(seed)
    U = random_orthonormal(n, r, F64, generator=g) + 1e-7 * torch.randn(n, r, dtype=F64, generator=g)
    Q, R = orthonormalize(U)
    torch.testing.assert_close(Q @ R, U, atol=IDENTITY[F64], rtol=0)
    assert orthogonality_error(Q) <= ORTHONORMAL[F64]
    assert bool((torch.diagonal(R) >= 0).all())
    assert float((R - torch.eye(r, dtype=F64)).abs().max()) < 1e-5


def test_integrator_runs_are_deterministic():
    """Same seed, same data: the same ranks and bitwise the same adapter tensors."""
    def run():
        torch.manual_seed(0)
        model = get_peft_model(MLP(), TuckerAdapterConfig(target_modules=["lin0", "lin1"], r=2, r_max=8, tau=0.05))
        train_steps(model, TDLRTIntegrator(model), steps=5)
        return adapter_ranks(model), {k: v.clone() for k, v in model.state_dict().items() if "tdlrt_" in k}

    (ranks_a, state_a), (ranks_b, state_b) = run(), run()
    assert ranks_a == ranks_b
    assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)


# --------------------------------------------------------------------- long runs (float32)
def long_run(steps: int, n: int = 16, seed: int = 0) -> dict:
    """``steps`` float32 TDLRT (Adam) steps on 0.5 ||W - T||^2 with a noisy gradient (the bases keep rotating).

    Gradients are written as the adapter's backward would (G_K = G V, G_L = G^T U, G_S = U^T G V); returns the
    worst orthonormality error seen and the final state."""
    torch.manual_seed(seed)
    model = get_peft_model(nn.Sequential(nn.Linear(n, n, bias=False)),
                           TuckerAdapterConfig(target_modules=["0"], r=2, r_max=8, tau=0.05))
    integrator = TDLRTIntegrator(model)
    storage = next(iter_storages(model))
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(n, 3, generator=g) @ torch.randn(3, n, generator=g) / 3
    worst, ranks_seen = 0.0, set()
    for _ in range(steps):
        core, (U, V) = storage.active()
        G = U @ core @ V.T - target + 0.05 * torch.randn(n, n, generator=g)      # dL/dW, noisy
        for param, grad in ((storage.factors[0], G @ V), (storage.factors[1], G.T @ U), (storage.core, U.T @ G @ V)):
            param.grad = torch.zeros_like(param)
            param.grad[: grad.shape[0], : grad.shape[1]] = grad
        assert integrator.step(0.01)
        core, (U, V) = storage.active()
        worst = max(worst, orthogonality_error(U), orthogonality_error(V))
        ranks_seen.add(storage.ranks[0])
    weight = (U @ core @ V.T).detach()
    return {"worst": worst, "weight": weight, "target": target, "ranks_seen": ranks_seen, "dtype": U.dtype}


def check_long_run(result) -> None:
    assert result["dtype"] == torch.float32
    assert result["worst"] < ORTHONORMAL[torch.float32], result["worst"]
    assert bool(torch.isfinite(result["weight"]).all())
    # it also learned: the weight is close to the rank-3 target (noise floor ~0.05 * lr-averaged)
    assert float(torch.linalg.norm(result["weight"] - result["target"])) < 0.2 * float(torch.linalg.norm(
        result["target"]))
    assert len(result["ranks_seen"]) > 1, "the ranks never changed"


def test_long_run_float32_stays_orthonormal_short():
    check_long_run(long_run(1_000))


@pytest.mark.slow
def test_long_run_float32_stays_orthonormal_10k_steps():
    check_long_run(long_run(10_000))
