"""Claim: TDLRT is robust to ill-conditioning, where factorized (LoRA) gradient descent diverges or stalls.

Problems (``problems.py``): regression and completion of a rank-8 ``W*`` with singular values 1 ... 1e-6, from an
ill-conditioned rank-8 start (singular values 1 ... 1e-6, random subspaces). Learning rates in units of
``1 / L`` (L = 1: full GD converges for ``λ < 2``). Methods:

* full GD on a dense W (reference for what the loss itself allows),
* LoRA ``W = B A`` (rank 8, the target's rank: the most favourable setting for it) with SGD and Adam, from
  balanced factors (``B = P sqrt(s)``, ``A = sqrt(s) R^T``) and from unbalanced ones (``B * 10``, ``A / 10``:
  the same start ``W0``),
* TDLRT at the fixed rank 8 (augment to 16, truncate back to 8: the same rank as LoRA): parallel and BUG with
  the SGD core (the theory's setting) and parallel with the library's Adam core; and rank-adaptive TDLRT
  (parallel, SGD, ranks in [1, 16], relative ``τ = 1e-5``). TDLRT only sees ``W0``, so balanced and unbalanced
  starts are the same run for it.

Reported per run: final loss and relative error, divergence, iterations until ``||W - W*|| / ||W*||`` reaches
1e-3 and 1e-5 (the latter needs the directions down to ~1e-5).
"""

from __future__ import annotations

from .methods import run_factorized, run_full, run_tdlrt
from .problems import completion, factor, regression, spread_initialisation

RANK = 8
R_MAX = 16
TAU = 1e-5
IMBALANCE = 10.0
TOLERANCES = (1e-3, 1e-5)
METHODS = ("full GD", "LoRA-SGD", "LoRA-SGD unbalanced", "LoRA-Adam", "LoRA-Adam unbalanced",
           "TDLRT-parallel", "TDLRT-BUG", "TDLRT-parallel-Adam", "TDLRT-parallel adaptive")
PROBLEMS = ("regression", "completion")


def tasks(settings) -> list[dict]:
    return [{"experiment": "stability", "problem": p, "method": m, "lr": lr, "steps": settings.stability_steps}
            for p in PROBLEMS for lr in settings.stability_lrs for m in METHODS]


def build(problem: str):
    prob = regression(rank=RANK) if problem == "regression" else completion(rank=RANK)
    return prob, spread_initialisation(prob, RANK)


def run(task: dict) -> dict:
    problem, W0 = build(task["problem"])
    method, lr, steps = task["method"], task["lr"], task["steps"]
    if method == "full GD":
        trajectory = run_full(problem, W0, lr, steps)
    elif method.startswith("LoRA"):
        B0, A0 = factor(W0, RANK, IMBALANCE if method.endswith("unbalanced") else 1.0)
        trajectory = run_factorized(problem, B0, A0, lr, steps, "adam" if "Adam" in method else "sgd", method)
    elif method.endswith("adaptive"):
        trajectory = run_tdlrt(problem, W0, lr, steps, "parallel", "sgd", rank_cap=R_MAX, tau=TAU, name=method)
    else:
        integrator = "bug" if "BUG" in method else "parallel"
        optimizer = "adam" if method.endswith("Adam") else "sgd"
        trajectory = run_tdlrt(problem, W0, lr, steps, integrator, optimizer, rank_cap=RANK, r_min=RANK, name=method)
    return {**task, **summary(trajectory), "curve": decimate(trajectory.losses), "error_curve":
            decimate(trajectory.errors)}


def summary(trajectory) -> dict:
    return {"final_loss": trajectory.losses[-1], "final_error": trajectory.errors[-1],
            "min_error": min(trajectory.errors), "diverged": trajectory.diverged,
            "final_rank": trajectory.ranks[-1], "iterations": len(trajectory.losses) - 1,
            **{f"steps_to_{t:g}": trajectory.steps_to(t) for t in TOLERANCES}, "seconds": trajectory.seconds}


def decimate(values: list[float], points: int = 200) -> list[tuple[int, float]]:
    stride = max(1, len(values) // points)
    return [(k, v) for k, v in enumerate(values) if k % stride == 0 or k == len(values) - 1]


# ------------------------------------------------------------------------------------------ report
def table(results: list[dict], problem: str, lrs: list[float]) -> str:
    """Markdown: one row per method, one column per learning rate; cell = final relative error / final loss and
    the iterations to 1e-3 in brackets, or 'div' when the run diverged."""
    rows = [r for r in results if r["problem"] == problem]
    head = "| method | " + " | ".join(f"λ={lr:g}" for lr in lrs) + " |"
    lines = [head, "|" + "---|" * (len(lrs) + 1)]
    for method in METHODS:
        cells = []
        for lr in lrs:
            r = next((x for x in rows if x["method"] == method and x["lr"] == lr), None)
            cells.append("–" if r is None else cell(r))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cell(r: dict) -> str:
    if r["diverged"]:
        return f"**div** (k={r['iterations']})"
    reached = r["steps_to_0.001"]
    return f"{r['final_error']:.1e} / {r['final_loss']:.0e} [{'–' if reached is None else reached}]"


def verdicts(results: list[dict], lrs: list[float]) -> dict:
    """Largest stable lr, and smallest iterations to 1e-3 / 1e-5 over the lr sweep, per (problem, method)."""
    out = {}
    for problem in PROBLEMS:
        for method in METHODS:
            runs = [r for r in results if r["problem"] == problem and r["method"] == method]
            stable = [r["lr"] for r in runs if not r["diverged"]]
            best = {}
            for t in TOLERANCES:
                reached = [r[f"steps_to_{t:g}"] for r in runs if r[f"steps_to_{t:g}"] is not None]
                best[f"best_steps_to_{t:g}"] = min(reached) if reached else None
            out[(problem, method)] = {"max_stable_lr": max(stable) if stable else None,
                                      "best_final_error": min((r["final_error"] for r in runs if not r["diverged"]),
                                                              default=None), **best}
    return out


def plot(results: list[dict], lrs: list[float], out_dir) -> list[str]:
    import matplotlib.pyplot as plt

    files = []
    styles = {m: s for m, s in zip(METHODS, ["k-", "C0-", "C0--", "C1-", "C1--", "C2-", "C3-", "C4-", "C5:"])}
    for problem in PROBLEMS:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for method in METHODS:
            runs = sorted((r for r in results if r["problem"] == problem and r["method"] == method),
                          key=lambda r: r["lr"])
            if not runs:
                continue
            x = [r["lr"] for r in runs]
            y = [1e3 if r["diverged"] else max(r["final_error"], 1e-16) for r in runs]
            axes[0].plot(x, y, styles[method], marker="o", label=method)
        axes[0].set(xscale="log", yscale="log", xlabel="learning rate λ (units of 1/L)",
                    ylabel="final ||W - W*|| / ||W*||  (1e3 = diverged)", title=f"{problem}: final error vs λ")
        axes[0].legend(fontsize=7)
        lr_curve = pick_curve_lr(results, problem, lrs)
        for method in METHODS:
            r = next((x for x in results if x["problem"] == problem and x["method"] == method
                      and x["lr"] == lr_curve), None)
            if r is not None:
                k, e = zip(*r["error_curve"])
                axes[1].plot(k, [max(v, 1e-16) for v in e], styles[method], label=method)
        axes[1].set(yscale="log", xlabel="iteration", ylabel="||W - W*|| / ||W*||",
                    title=f"{problem}: error curves at λ = {lr_curve:g}", ylim=(1e-12, 1e4))
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"stability_{problem}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path.name)
    return files


def pick_curve_lr(results: list[dict], problem: str, lrs: list[float]) -> float:
    """The largest lr at which TDLRT-parallel did not diverge (the interesting regime)."""
    stable = [r["lr"] for r in results if r["problem"] == problem and r["method"] == "TDLRT-parallel"
              and not r["diverged"]]
    return max(stable) if stable else lrs[len(lrs) // 2]
