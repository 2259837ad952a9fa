"""Claim: for a small enough step λ the TDLRT step decreases the full-batch loss,
``L(W_{k+1}) <= L(W_k) - λ (1 - Lλ/2) ||P_T G||^2 + O(τ)``: every step descends when τ = 0 and λ < 2/L, and the
truncation can cost at most a τ-sized increase.

Problem: the noise-free regression of ``problems.py`` (L = 1) from the ill-conditioned random rank-8 start; full
batch. Rank-adaptive TDLRT (ranks in [1, 16], relative τ), parallel and BUG, SGD core; LoRA-SGD (balanced) for
reference. A step "descends" when ``L_{k+1} <= L_k + 1e-12 L_0`` (the slack absorbs float64 round-off once the
loss has converged to ~1e-30).
"""

from __future__ import annotations

import itertools

from .methods import run_factorized, run_tdlrt
from .problems import factor, regression, spread_initialisation

RANK = 8
RANK_CAP = 16
SLACK = 1e-12


def tasks(settings) -> list[dict]:
    tdlrt = [{"experiment": "descent", "method": f"TDLRT-{integrator}", "lr": lr, "tau": tau,
              "steps": settings.descent_steps}
             for integrator, lr, tau in itertools.product(("parallel", "bug"), settings.descent_lrs,
                                                          settings.descent_taus)]
    lora = [{"experiment": "descent", "method": "LoRA-SGD", "lr": lr, "tau": None, "steps": settings.descent_steps}
            for lr in settings.descent_lrs]
    return tdlrt + lora


def run(task: dict) -> dict:
    problem = regression(rank=RANK)
    W0 = spread_initialisation(problem, RANK)
    if task["method"] == "LoRA-SGD":
        B0, A0 = factor(W0, RANK)
        trajectory = run_factorized(problem, B0, A0, task["lr"], task["steps"], "sgd")
    else:
        integrator = task["method"].split("-")[1]
        trajectory = run_tdlrt(problem, W0, task["lr"], task["steps"], integrator, "sgd", rank_cap=RANK_CAP,
                               tau=task["tau"])
    return {**task, **descent_statistics(trajectory.losses), "diverged": trajectory.diverged,
            "final_loss": trajectory.losses[-1], "final_rank": trajectory.ranks[-1]}


def descent_statistics(losses: list[float]) -> dict:
    """Fraction of steps that descend, the first one that does not, and the largest relative increase."""
    slack = SLACK * losses[0]
    steps = list(zip(losses, losses[1:]))
    descending = [after <= before + slack for before, after in steps]
    increases = [(after - before) / before for before, after in steps if before > 0]
    return {"descent_fraction": sum(descending) / max(len(steps), 1),
            "first_ascent": next((k for k, ok in enumerate(descending) if not ok), None),
            "max_relative_increase": max(increases, default=0.0)}


def table(results: list[dict], lrs: list[float], taus: list[float]) -> str:
    """Markdown: rows method x τ, columns λ; cell = descent fraction (first ascending step)."""
    lines = ["| method | τ (relative) | " + " | ".join(f"λ={lr:g}" for lr in lrs) + " |",
             "|---|---|" + "---|" * len(lrs)]
    rows = [(m, t) for m in ("TDLRT-parallel", "TDLRT-bug") for t in taus] + [("LoRA-SGD", None)]
    for method, tau in rows:
        cells = []
        for lr in lrs:
            r = next((x for x in results if x["method"] == method and x["lr"] == lr and x["tau"] == tau), None)
            if r is None:
                cells.append("–")
            elif r["diverged"]:
                cells.append("**div**")
            else:
                first = "" if r["first_ascent"] is None else f" (k={r['first_ascent']})"
                cells.append(f"{100 * r['descent_fraction']:.1f}%{first}")
        lines.append(f"| {method} | {'–' if tau is None else f'{tau:g}'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], lrs: list[float], taus: list[float], out_dir) -> list[str]:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, method in zip(axes, ("TDLRT-parallel", "TDLRT-bug")):
        for tau in taus:
            line = sorted((r for r in results if r["method"] == method and r["tau"] == tau and not r["diverged"]),
                          key=lambda r: r["lr"])
            ax.semilogx([r["lr"] for r in line], [100 * r["descent_fraction"] for r in line], "o-",
                        label=f"τ={tau:g}")
        lora = sorted((r for r in results if r["method"] == "LoRA-SGD" and not r["diverged"]), key=lambda r: r["lr"])
        ax.semilogx([r["lr"] for r in lora], [100 * r["descent_fraction"] for r in lora], "k--", label="LoRA-SGD")
        ax.set(xlabel="λ (units of 1/L)", ylabel="% of steps decreasing the full-batch loss", title=method)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "descent.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path.name]
