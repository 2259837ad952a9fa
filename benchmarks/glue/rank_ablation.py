"""Table and plot of a rank-schedule ablation: one runner output folder per variant (seeds inside).

    PYTHONPATH=. python -m benchmarks.glue.rank_ablation OUT.md OUT.png NAME=FOLDER [NAME=FOLDER ...] [--test]
        [--after STEP]     # also count the rank changes after optimizer step STEP (a frozen variant's last decision)

Per variant: validation accuracy (``validation_accuracy`` where the dataset has a test split, else ``accuracy``),
with ``--test`` also the test accuracy, active parameters at the end, rank changes after 10 % / 25 % of the
steps (mean ± std over seeds), and the mean rank over the optimizer steps of every seed (rebuilt from each run's
``rank_changes``, so every change is shown).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def load(folder: str) -> list[dict]:
    runs = [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))]
    return sorted((r for r in runs if isinstance(r, dict) and "metrics" in r), key=lambda r: r["seed"])


def rebuilt_history(run: dict) -> list[dict]:
    """The ranks after every optimizer step, from the start ranks and the changes (``active_params`` None)."""
    ranks = dict(run["rank_history"][0]["ranks"])
    by_step: dict[int, list] = {}
    for step, module, _, new in run.get("rank_changes", []):
        by_step.setdefault(step, []).append((module, new))
    history = [{"step": 0, "active_params": None, "ranks": dict(ranks)}]
    for step in range(1, run["optimizer_steps"] + 1):
        ranks.update(by_step.get(step, []))
        history.append({"step": step, "active_params": None, "ranks": dict(ranks)})
    return history


def mean_rank_curve(run: dict) -> tuple[list[int], list[float]]:
    """(steps, mean over modules of the largest mode rank) after every step, from the start ranks and changes."""
    ranks = {m: max(r) for m, r in run["rank_history"][0]["ranks"].items()}
    by_step: dict[int, list] = {}
    for step, module, _, new in run.get("rank_changes", []):
        by_step.setdefault(step, []).append((module, max(new)))
    steps, means = [0], [float(np.mean(list(ranks.values())))]
    for step in range(1, run["optimizer_steps"] + 1):
        for module, r in by_step.get(step, []):
            ranks[module] = r
        steps.append(step)
        means.append(float(np.mean(list(ranks.values()))))
    return steps, means


def fmt(values, scale=100.0, digits=2) -> str:
    v = np.asarray(values, dtype=float) * scale
    std = v.std(ddof=1) if v.size > 1 else 0.0
    return f"{v.mean():.{digits}f} ± {std:.{digits}f}"


def table(variants: dict[str, list[dict]], test: bool, after: int | None = None) -> str:
    head = "| Variant | Seeds | Validation acc. (×100) |" + (" Test acc. (×100) |" if test else "") + \
        " Active params | Rank changes after 10 % | after 25 % |" + (f" after step {after} |" if after else "") + \
        " Per seed (validation) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, runs in variants.items():
        val = [r["metrics"].get("validation_accuracy", r["metrics"]["accuracy"]) for r in runs]
        cells = [name, ", ".join(str(r["seed"]) for r in runs), fmt(val)]
        if test:
            cells.append(fmt([r["metrics"]["accuracy"] for r in runs]))
        cells += [f"{np.mean([r['trainable_params'] for r in runs]) / 1e3:.0f}K",
                  fmt([r.get("rank_changes_after_10pct", 0) for r in runs], 1, 1),
                  fmt([r.get("rank_changes_after_25pct", 0) for r in runs], 1, 1),
                  *([fmt([sum(c[0] > after for c in r.get("rank_changes", [])) for r in runs], 1, 1)] if after else []),
                  " / ".join(f"{100 * v:.1f}" for v in val)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(variants: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (name, runs) in enumerate(variants.items()):
        for j, run in enumerate(runs):
            steps, means = mean_rank_curve(run)
            ax.plot(steps, means, color=f"C{i}", alpha=0.8, label=name if j == 0 else None)
        total = runs[0]["optimizer_steps"]
    for p in (0.10, 0.25):
        ax.axvline(p * total, color="gray", ls=":", lw=1)
    ax.set_xlabel("optimizer step (dotted: 10 % and 25 % of the run)")
    ax.set_ylabel("mean rank over the adapters")
    ax.set_title("rank after every optimizer step (one line per seed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    test = "--test" in argv
    argv = [a for a in argv if a != "--test"]
    after = None
    if "--after" in argv:
        i = argv.index("--after")
        after = int(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    out_md, out_png, specs = Path(argv[0]), Path(argv[1]), argv[2:]
    variants = {name: load(folder) for name, folder in (s.split("=", 1) for s in specs)}
    variants = {k: v for k, v in variants.items() if v}
    text = table(variants, test, after)
    out_md.write_text(text + "\n")
    plot(variants, out_png)
    from ..rank_history import plot_rank_history

    for name, runs in variants.items():                # per-module heat map of each variant's first seed
        slug = "".join(c if c.isascii() and c.isalnum() else "_" for c in name.replace("τ", "tau")).strip("_")
        plot_rank_history(rebuilt_history(runs[0]), f"{name} · seed {runs[0]['seed']}: rank per module after every "
                          "optimizer step", out_png.with_name(f"{out_png.stem}_{slug}.png"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
