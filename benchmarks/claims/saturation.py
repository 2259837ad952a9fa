"""A finding about the library, not a claim of the paper: what happens when the rank reaches ``r_max``.

The paper augments a rank-r basis to 2r and then truncates (with a rank cap in the truncation). The library
stores ``r_max`` columns, so from rank r a step can add only ``r_max - r`` directions: at ``r = r_max`` nothing
is added, the bases stop moving and the step is a Galerkin step in frozen bases. Measured here: rank-adaptive
TDLRT (parallel, SGD, relative τ = 1e-5) with the library's bounds (``r_max = 16``: storage = cap = 16) against
the paper's (cap 16, storage 32), on both stability problems.
"""

from __future__ import annotations

import itertools

from .methods import library_layer, run_tdlrt
from .stability import build

RANK_CAP = 16
TAU = 1e-5
VARIANTS = ("library: storage = cap = 16", "paper: cap 16, storage 32")


def tasks(settings) -> list[dict]:
    return [{"experiment": "saturation", "problem": p, "variant": v, "lr": lr, "steps": settings.stability_steps}
            for p, v, lr in itertools.product(("regression", "completion"), VARIANTS, settings.saturation_lrs)]


def run(task: dict) -> dict:
    problem, W0 = build(task["problem"])
    layer = library_layer(W0, RANK_CAP, TAU) if task["variant"].startswith("library") else None
    trajectory = run_tdlrt(problem, W0, task["lr"], task["steps"], "parallel", "sgd", layer=layer,
                           rank_cap=RANK_CAP, tau=TAU)
    return {**task, "final_loss": trajectory.losses[-1], "final_error": trajectory.errors[-1],
            "final_rank": trajectory.ranks[-1], "max_rank": max(trajectory.ranks), "diverged": trajectory.diverged}


def table(results: list[dict]) -> str:
    lines = ["| problem | variant | λ | final loss | final ‖W−W*‖/‖W*‖ | final rank |", "|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["problem"], r["variant"], r["lr"])):
        lines.append(f"| {r['problem']} | {r['variant']} | {r['lr']:g} | {r['final_loss']:.2e} | "
                     f"{r['final_error']:.2e} | {r['final_rank']} |")
    return "\n".join(lines)
