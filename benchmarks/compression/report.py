"""Markdown table and accuracy-vs-compression plot from the run JSONs."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..rank_history import plot_rank_history
from .methods import LABELS

ORDER = {"dense": 0, "tdlrt": 1, "tucker-gd": 2, "matrix": 3}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _pm(values: list[float], digits: int = 2, sign: str = "") -> str:
    """``mean ± std`` of ``values`` ("-" when empty); ``sign="+"`` prints the sign of the mean."""
    if not values:
        return "-"
    mean, std = _mean_std(values)
    return f"{mean:{sign}.{digits}f} ± {std:.{digits}f}"


def _ranks_text(ranks: dict) -> str:
    return ", ".join("x".join(str(r) for r in rs) for rs in ranks.values()) or "-"


def summarize(results: list[dict]) -> list[dict]:
    """One row per (network, method, tau, freeze, budget): means over seeds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in results:
        groups[(r["network"], r["method"], r["tau"], r.get("freeze"), r.get("target_params"))].append(r)
    rows = []
    for (network, kind, tau, freeze, budget), runs in groups.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        acc, acc_std = _mean_std([100 * r["accuracy"] for r in runs])
        validation = [100 * r["validation_accuracy"] for r in runs if "validation_accuracy" in r]
        late = [r.get("rank_changes_after_25pct", 0) for r in runs]
        time, time_std = _mean_std([r["wall_time_s"] for r in runs])
        cpu = [r["cpu_time_s"] for r in runs if "cpu_time_s" in r]
        rows.append({"network": network, "method": kind, "tau": tau, "freeze": freeze, "budget": budget,
                     "label": runs[0]["label"],
                     "seeds": len(runs), "validation": _pm(validation), "late_changes": _pm(late, 1),
                     "conv_params": float(np.mean([r["conv_params"] for r in runs])),
                     "compression": float(np.mean([r["compression"] for r in runs])),
                     "accuracy": acc, "accuracy_std": acc_std, "time": time, "time_std": time_std,
                     "cpu_time": float(np.mean(cpu)) if cpu else float("nan"),
                     "ranks": _ranks_text(runs[0]["ranks"]), "accuracies": [r["accuracy"] for r in runs]})
    return sorted(rows, key=lambda r: (r["network"], ORDER[r["method"]], r["budget"] or 0, r["tau"] or 0.0,
                                       r["freeze"] or 0.0))


def markdown_table(rows: list[dict]) -> str:
    validation = any(r["validation"] != "-" for r in rows)
    header = ["network", "method", "conv params", "compression", *(["validation acc. (%)"] if validation else []),
              "test acc. (%)", "rank changes after 25 %", "wall time (s)", "CPU time (s)", "ranks (seed 0)"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 3) + "---|"]
    for r in rows:
        cells = [r["network"], r["label"], f"{r['conv_params']:.0f}", f"{100 * r['compression']:.1f} %"]
        if validation:
            cells.append(r["validation"])
        cells += [f"{r['accuracy']:.2f} ± {r['accuracy_std']:.2f}", r["late_changes"],
                  f"{r['time']:.0f} ± {r['time_std']:.0f}", f"{r['cpu_time']:.0f}", r["ranks"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(results: list[dict]) -> str:
    """TDLRT minus fixed-rank GD at the same ranks (same seed): accuracy difference in points."""
    by_key = {(r["network"], r["method"], r["tau"], r["seed"]): r for r in results if r.get("freeze") is None}
    lines = ["| network | tau | compression | TDLRT − fixed-rank GD (points, mean ± std over seeds) |",
             "|---|---:|---:|---:|"]
    pairs: dict[tuple, list[float]] = defaultdict(list)
    compression: dict[tuple, list[float]] = defaultdict(list)
    for (network, kind, tau, seed), r in by_key.items():
        other = by_key.get((network, "tucker-gd", tau, seed))
        if kind == "tdlrt" and other is not None:
            pairs[(network, tau)].append(100 * (r["accuracy"] - other["accuracy"]))
            compression[(network, tau)].append(r["compression"])
    for (network, tau), diffs in sorted(pairs.items()):
        mean, std = _mean_std(diffs)
        lines.append(f"| {network} | {tau:g} | {100 * np.mean(compression[(network, tau)]):.1f} % | "
                     f"{mean:+.2f} ± {std:.2f} |")
    return "\n".join(lines) if pairs else ""


def freeze_table(results: list[dict]) -> str:
    """Free ranks minus ranks frozen at a fraction f (same network, tau, seed): accuracy difference in points, on
    validation (when scored) and test, with the parameters of each."""
    free = {(r["network"], r["tau"], r["seed"]): r for r in results
            if r["method"] == "tdlrt" and r.get("freeze") is None}
    pairs: dict[tuple, list[tuple[dict, dict]]] = defaultdict(list)
    for r in results:
        other = free.get((r["network"], r["tau"], r["seed"]))
        if r["method"] == "tdlrt" and r.get("freeze") is not None and other is not None:
            pairs[(r["network"], r["tau"], r["freeze"])].append((other, r))
    lines = ["| network | tau | frozen at | seeds | free − frozen, validation (points) | free − frozen, test "
             "(points) | conv params free / frozen | per seed (test) |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for (network, tau, freeze), runs in sorted(pairs.items()):
        runs.sort(key=lambda pair: pair[0]["seed"])
        test = [100 * (a["accuracy"] - b["accuracy"]) for a, b in runs]
        val = [100 * (a["validation_accuracy"] - b["validation_accuracy"]) for a, b in runs
               if "validation_accuracy" in a and "validation_accuracy" in b]
        params = " / ".join(f"{np.mean([pair[i]['conv_params'] for pair in runs]):.0f}" for i in (0, 1))
        lines.append(f"| {network} | {tau:g} | {100 * freeze:g} % | {len(runs)} | {_pm(val, sign='+')} | "
                     f"{_pm(test, sign='+')} | {params} | {' / '.join(f'{d:+.2f}' for d in test)} |")
    return "\n".join(lines) if pairs else ""


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    networks = sorted({r["network"] for r in rows})
    fig, axes = plt.subplots(1, len(networks), figsize=(6 * len(networks), 4.2), squeeze=False)
    for ax, network in zip(axes[0], networks):
        for kind, marker in [("tdlrt", "o"), ("tucker-gd", "s"), ("matrix", "^")]:
            points = [r for r in rows if r["network"] == network and r["method"] == kind and r["freeze"] is None]
            for budget in (False, True):                  # tau runs as a line, budget runs as points
                chosen = [p for p in points if (p["budget"] is not None) == budget]
                if chosen:
                    ax.errorbar([100 * p["compression"] for p in chosen], [p["accuracy"] for p in chosen],
                                yerr=[p["accuracy_std"] for p in chosen], marker="D" if budget else marker,
                                linestyle="none" if budget else "-", capsize=3,
                                label=LABELS[kind] + (" (budget)" if budget else ""))
        for r in rows:
            if r["network"] == network and r["method"] == "dense":
                ax.axhline(r["accuracy"], color="black", linestyle="--", label="dense")
                ax.axhspan(r["accuracy"] - r["accuracy_std"], r["accuracy"] + r["accuracy_std"], color="0.85")
        ax.set_title(network)
        ax.set_xlabel("convolution compression (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: list[dict], output_dir: Path, header: str) -> str:
    rows = summarize(results)
    tables = [markdown_table(rows), paired_table(results), freeze_table(results)]
    text = "\n\n".join(part for part in [header, *tables] if part)
    (output_dir / "results.md").write_text(text + "\n")
    plot(rows, output_dir / "accuracy_vs_compression.png")
    for r in results:                                  # the rank-per-layer plot of each rank-adaptive run
        if r.get("rank_history") and r["seed"] == min(x["seed"] for x in results if x["label"] == r["label"]):
            slug = re.sub(r"[^A-Za-z0-9]+", "_", f"{r['network']}_{r['label']}").strip("_")
            plot_rank_history(r["rank_history"], f"{r['network']} · {r['label']} · seed {r['seed']}: rank per "
                              f"layer ({r['rank_changes_after_10pct']} changes after 10 % of the steps)",
                              output_dir / f"ranks_{slug}.png")
    return text
