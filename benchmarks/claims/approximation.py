"""Claim: the TDLRT trajectory stays close to the full-rank gradient flow,
``||W_k - W(kλ)|| <= c1 ε + c2 λ + c3 τ / λ`` on a finite time horizon (ε: the part of the gradient normal to the
low-rank manifold along the trajectory, λ: the step, τ: the absolute truncation tolerance per step).

Problem: the regression of ``problems.py`` (``λ_max(Σ) = 1``), so the flow is known in closed form,
``W(t) = W_ls + (W0 - W_ls) exp(-t Σ)``, from an ill-conditioned rank-8 start in the target's singular subspaces
(singular values 1e-6 ... 1 in reverse order): without noise the flow stays of rank 8 (ε = 0). The model error
is varied by adding noise to the minimiser (a full-rank part no rank-16 matrix fits); ε is *measured* as
``max_k ||(I - U_k U_k^T) G(W_k) (I - V_k V_k^T)||_F`` along the τ = 0 run with the same λ and noise.
Rank-adaptive TDLRT, ranks in [1, 16], absolute ``τ``. Per run: the largest distance over ``t = kλ <= T`` to the
flow and to full GD with the same λ. The constants are fitted by non-negative least squares over all runs.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import Tensor

from .methods import run_tdlrt
from .problems import aligned_initialisation, regression

RANK = 8
RANK_CAP = 16
HORIZON = 5.0
INTEGRATORS = ("parallel", "bug")


def tasks(settings) -> list[dict]:
    grid = itertools.product(settings.approx_lrs, settings.approx_taus, settings.approx_noises, INTEGRATORS)
    return [{"experiment": "approximation", "lr": lr, "tau": tau, "noise": noise, "integrator": integrator,
             "horizon": settings.approx_horizon} for lr, tau, noise, integrator in grid]


class Distances:
    """Observer of a TDLRT run: distance to the exact flow and to full GD, and the normal gradient component."""

    def __init__(self, problem, W0: Tensor, lr: float):
        self.problem, self.lr, self.k = problem, lr, 0
        self.evals, self.evecs = torch.linalg.eigh(problem.inputs.T @ problem.inputs)   # Σ = Q diag(e) Q^T
        self.W0 = W0
        self.gd = W0.clone()
        self.to_flow = self.to_gd = self.normal = self.gd_to_flow = 0.0

    def flow(self, t: float) -> Tensor:
        decay = self.evecs @ torch.diag(torch.exp(-t * self.evals)) @ self.evecs.T
        return self.problem.minimiser + (self.W0 - self.problem.minimiser) @ decay

    def __call__(self, W: Tensor, U: Tensor, V: Tensor) -> None:
        flow = self.flow(self.k * self.lr)
        self.to_flow = max(self.to_flow, torch.linalg.norm(W - flow).item())
        self.to_gd = max(self.to_gd, torch.linalg.norm(W - self.gd).item())
        self.gd_to_flow = max(self.gd_to_flow, torch.linalg.norm(self.gd - flow).item())
        G = self.problem.gradient(W)
        normal = G - U @ (U.T @ G)                      # (I - UU^T) G
        normal = normal - (normal @ V) @ V.T            # (I - UU^T) G (I - VV^T)
        self.normal = max(self.normal, torch.linalg.norm(normal).item())
        self.gd = self.gd - self.lr * self.problem.gradient(self.gd)
        self.k += 1


def run(task: dict) -> dict:
    problem = regression(rank=RANK, noise=task["noise"])
    W0 = aligned_initialisation(problem, RANK)
    lr = task["lr"]
    steps = int(round(task["horizon"] / lr))
    observer = Distances(problem, W0, lr)
    trajectory = run_tdlrt(problem, W0, lr, steps, task["integrator"], "sgd", observe=observer, rank_cap=RANK_CAP,
                           tau=task["tau"], absolute_tau=True)
    return {**task, "steps": steps, "to_flow": observer.to_flow, "to_gd": observer.to_gd,
            "gd_to_flow": observer.gd_to_flow, "epsilon": observer.normal, "final_rank": trajectory.ranks[-1],
            "max_rank": max(trajectory.ranks), "diverged": trajectory.diverged, "seconds": trajectory.seconds}


def model_error(results: list[dict]) -> dict:
    """ε of each (integrator, λ, noise): the normal gradient component measured on the τ = 0 run, so that the
    truncation's own effect is left to the τ/λ term."""
    return {(r["integrator"], r["lr"], r["noise"]): r["epsilon"] for r in results if r["tau"] == 0}


def features(results: list[dict]) -> np.ndarray:
    """Rows ``[ε, λ, τ/λ]`` of the bound, one per run."""
    eps = model_error(results)
    return np.array([[eps.get((r["integrator"], r["lr"], r["noise"]), r["epsilon"]), r["lr"], r["tau"] / r["lr"]]
                     for r in results])


def fit_bound(results: list[dict], key: str = "to_flow", floor: float = 0.0) -> dict:
    """Non-negative least squares ``e ≈ c1 ε + c2 λ + c3 τ/λ`` with relative residuals (each run weighted by
    1/e, so small and large errors count alike); returns the constants, the worst under-prediction (measured /
    fitted) and R² of log e. Runs of one integrator; runs with ``e <= floor`` (round-off) are left out."""
    from scipy.optimize import nnls

    rows = [r for r in results if not r["diverged"] and r[key] > floor]
    if len(rows) < 3:
        return {}
    X = features(rows)                                   # (runs, 3)
    errors = np.array([r[key] for r in rows])
    coefficients, _ = nnls(X / errors[:, None], np.ones(len(rows)))
    predicted = X @ coefficients
    ratio = errors / np.maximum(predicted, 1e-300)
    log_e, log_p = np.log10(errors), np.log10(np.maximum(predicted, 1e-300))
    r2 = 1 - ((log_e - log_p) ** 2).sum() / ((log_e - log_e.mean()) ** 2).sum()
    return {"c1": coefficients[0], "c2": coefficients[1], "c3": coefficients[2], "r2_log": float(r2),
            "max_ratio": float(ratio.max()), "median_ratio": float(np.median(ratio)), "runs": len(rows)}


def slope_in_lambda(results: list[dict], integrator: str) -> float:
    """Log-log slope of the distance to the flow against λ (τ = 0, no noise; the bound says 1)."""
    rows = sorted((r for r in results if r["integrator"] == integrator and r["noise"] == 0 and r["tau"] == 0
                   and not r["diverged"]), key=lambda r: r["lr"])
    if len(rows) < 2:
        return float("nan")
    return float(np.polyfit(np.log10([r["lr"] for r in rows]), np.log10([r["to_flow"] for r in rows]), 1)[0])


def truncation_ratio(results: list[dict], integrator: str) -> float:
    """Largest ``(d_GD(τ) - d_GD(0)) / (τ T/λ)`` over the runs with τ > 0: the truncation's share of the distance
    to full GD relative to its worst case, τ lost at each of the T/λ steps (the bound's τ/λ term with c3 = T)."""
    base = {(r["lr"], r["noise"]): r["to_gd"] for r in results if r["integrator"] == integrator and r["tau"] == 0}
    ratios = [(r["to_gd"] - base[r["lr"], r["noise"]]) / (r["tau"] * r["steps"]) for r in results
              if r["integrator"] == integrator and r["tau"] > 0 and not r["diverged"] and (r["lr"], r["noise"]) in base]
    return max(ratios, default=float("nan"))


def plot(results: list[dict], out_dir) -> list[str]:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4.3))
    for integrator, marker in zip(INTEGRATORS, "os"):
        rows = [r for r in results if r["integrator"] == integrator and not r["diverged"]]
        fit = fit_bound(rows)
        if fit:
            predicted = features(rows) @ np.array([fit["c1"], fit["c2"], fit["c3"]])
            axes[0].loglog(predicted, [r["to_flow"] for r in rows], marker, alpha=0.6, label=integrator)
        base = [r for r in rows if r["noise"] == 0]
        for tau in sorted({r["tau"] for r in base}):
            line = sorted((r for r in base if r["tau"] == tau), key=lambda r: r["lr"])
            axes[1].loglog([r["lr"] for r in line], [r["to_flow"] for r in line], marker + "-",
                           label=f"{integrator} τ={tau:g}")
        lrs = sorted({r["lr"] for r in base})
        for lr in lrs[:: max(1, len(lrs) // 3)]:
            line = sorted((r for r in base if r["lr"] == lr and r["tau"] > 0), key=lambda r: r["tau"])
            axes[2].loglog([r["tau"] for r in line], [r["to_gd"] for r in line], marker + "-",
                           label=f"{integrator} λ={lr:g}")
        for lr in lrs[:: max(1, len(lrs) // 3)]:
            line = sorted((r for r in rows if r["tau"] == 0 and r["lr"] == lr and r["noise"] > 0),
                          key=lambda r: r["epsilon"])
            axes[3].loglog([r["epsilon"] for r in line], [r["to_gd"] for r in line], marker + "-",
                           label=f"{integrator} λ={lr:g}")
    lo, hi = axes[0].get_xlim()
    axes[0].plot([lo, hi], [lo, hi], "k--", lw=1, label="measured = fitted bound")
    axes[0].set(xlabel="c1 ε + c2 λ + c3 τ/λ (fitted)", ylabel="max_t ||W_k - W(kλ)||",
                title="distance to the gradient flow vs the bound")
    axes[1].set(xlabel="λ", ylabel="max_t ||W_k - W(kλ)||", title="vs λ (no noise)")
    axes[2].set(xlabel="τ (absolute)", ylabel="max_k ||W_k - W_k(full GD)||",
                title="low-rank error: distance to full GD vs τ (no noise)")
    axes[3].set(xlabel="ε (measured normal gradient)", ylabel="max_k ||W_k - W_k(full GD)||",
                title="low-rank error: distance to full GD vs ε (τ = 0)")
    for ax in axes:
        ax.legend(fontsize=6)
    fig.tight_layout()
    path = out_dir / "approximation.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path.name]
