"""The paper's qualitative claims at small scale with fixed seeds (the full sweeps: ``python -m benchmarks.claims``).

Problem: ``W*`` 20 x 16 of rank 4 with singular values 1 ... 1e-4, Gaussian-design regression (λ_max(Σ) = 1, so
λ is in units of 1/L), from an ill-conditioned rank-4 start. Float64, full batch.
"""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.claims import approximation, descent
from benchmarks.claims.methods import run_factorized, run_full, run_tdlrt
from benchmarks.claims.problems import aligned_initialisation, factor, regression, spread_initialisation

RANK = 4


def problem(noise: float = 0.0):
    return regression(n_out=20, n_in=16, rank=RANK, smallest=1e-4, noise=noise, samples=64, seed=0)


def start(prob):
    return spread_initialisation(prob, RANK, smallest=1e-4)


@pytest.mark.parametrize("integrator", ["parallel", "bug"])
def test_tdlrt_converges_where_factorized_gradient_descent_diverges_or_stalls(integrator):
    prob = problem()
    W0 = start(prob)
    lr, steps = 1.0, 120
    tdlrt = run_tdlrt(prob, W0, lr, steps, integrator, "sgd", rank_cap=RANK, r_min=RANK)
    balanced = run_factorized(prob, *factor(W0, RANK), lr, steps, "sgd")
    unbalanced = run_factorized(prob, *factor(W0, RANK, imbalance=10.0), lr, steps, "sgd")
    assert not tdlrt.diverged and tdlrt.errors[-1] < 1e-3
    assert tdlrt.steps_to(1e-3) <= 1.2 * run_full(prob, W0, lr, steps).steps_to(1e-3)   # as fast as full GD
    assert unbalanced.diverged                                                           # same W0, other factors
    assert balanced.steps_to(1e-3) is None and balanced.errors[-1] > 10 * tdlrt.errors[-1]   # stalls


def test_tdlrt_is_stable_up_to_the_full_gradient_descent_limit():
    """Full GD on this 1-smooth loss is stable for λ < 2; TDLRT at λ = 1.9 converges too, and diverges at 2.5
    like full GD (the step's stability is the loss's, not the parametrisation's)."""
    prob = problem()
    W0 = start(prob)
    assert run_tdlrt(prob, W0, 1.9, 150, "parallel", "sgd", rank_cap=RANK, r_min=RANK).errors[-1] < 1e-3
    assert run_tdlrt(prob, W0, 2.5, 150, "parallel", "sgd", rank_cap=RANK, r_min=RANK).diverged
    assert run_full(prob, W0, 2.5, 150).diverged


@pytest.mark.parametrize("integrator", ["parallel", "bug"])
def test_every_step_descends_at_tau_zero(integrator):
    prob = problem()
    for lr, steps in ((0.1, 20), (1.0, 40)):
        trajectory = run_tdlrt(prob, start(prob), lr, steps, integrator, "sgd", rank_cap=2 * RANK)
        assert descent.descent_statistics(trajectory.losses)["descent_fraction"] == 1.0


def approximation_run(lr, tau=0.0, noise=0.0, integrator="parallel", horizon=2.0):
    prob = problem(noise)
    W0 = aligned_initialisation(prob, RANK)
    observer = approximation.Distances(prob, W0, lr)
    run_tdlrt(prob, W0, lr, int(round(horizon / lr)), integrator, "sgd", observe=observer, rank_cap=2 * RANK,
              tau=tau, absolute_tau=True)
    return observer


def test_tdlrt_equals_full_gradient_descent_when_the_flow_stays_low_rank():
    """ε = 0 and τ = 0: the trajectory is full GD's, so its distance to the flow is GD's O(λ) error."""
    coarse, fine = approximation_run(0.2), approximation_run(0.1)
    for run in (coarse, fine):
        assert run.to_gd < 1e-10
        assert run.normal < 1e-10
    assert 1.6 < coarse.to_flow / fine.to_flow < 2.4          # first order in λ


def test_distance_grows_with_the_model_error_and_the_truncation():
    lr, horizon = 0.1, 2.0
    clean = approximation_run(lr, horizon=horizon)
    noisy = approximation_run(lr, noise=1e-2, horizon=horizon)
    # c1 ε: the distance to full GD is of the size of the measured normal gradient component
    assert 0.1 * noisy.normal < noisy.to_gd < 3 * noisy.normal
    # c3 τ/λ: the truncation moves the trajectory away from GD, more for a larger τ, and by no more than the
    # worst case of τ per step
    steps = int(round(horizon / lr))
    small, large = (approximation_run(lr, tau=tau, horizon=horizon) for tau in (1e-2, 1e-1))
    assert 1e6 * clean.to_gd < small.to_gd < large.to_gd
    assert small.to_gd < 1e-2 * steps and large.to_gd < 1e-1 * steps


def test_bound_fit_recovers_known_constants():
    rng = np.random.default_rng(0)
    rows = [{"integrator": "parallel", "lr": lr, "tau": tau, "noise": noise, "epsilon": eps, "diverged": False,
             "to_flow": (0.5 * eps + 0.2 * lr + 3.0 * tau / lr) * (1 + 0.01 * rng.standard_normal())}
            for lr in (0.4, 0.1, 0.025) for tau in (0.0, 1e-4, 1e-2) for noise, eps in ((0.0, 0.0), (0.1, 0.05))]
    fit = approximation.fit_bound(rows)
    assert fit["c1"] == pytest.approx(0.5, rel=0.1)
    assert fit["c2"] == pytest.approx(0.2, rel=0.1)
    assert fit["c3"] == pytest.approx(3.0, rel=0.1)
    assert fit["max_ratio"] < 1.1


def test_descent_statistics():
    stats = descent.descent_statistics([4.0, 3.0, 3.5, 1.0, 1.0])
    assert stats["descent_fraction"] == 0.75
    assert stats["first_ascent"] == 1
    assert stats["max_relative_increase"] == pytest.approx(0.5 / 3.0)


def test_command_writes_summary_and_figures(tmp_path):
    from benchmarks.claims.__main__ import main

    assert main(["--quick", "--only", "descent", "--workers", "0", "--output-dir", str(tmp_path)]) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "**Descent**" in summary and "held" in summary
    assert (tmp_path / "descent.png").stat().st_size > 10_000
    assert (tmp_path / "results.json").exists()
