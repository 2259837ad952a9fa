"""``python -m benchmarks.speed --counts``: integrator step counts against adapters and distinct ranks, vs targets.

One counted ``TDLRTIntegrator.step`` (``counts.py``) per point on the MiniLM-shaped model (``minilm.py``), for
both core optimizers: against the number of adapters (6, 12, 24, 48 layers -> 36, 72, 144, 288 adapters; 8
distinct ranks) and against the number of distinct ranks (1, 2, 4, 8; 36 adapters), plus one steady-state point
(36 adapters after two full steps). ``write`` puts counts.json, counts.md and counts.png in the output folder.

Targets (issue #13, CPU, 6-layer model with mixed ranks, per step): at most ``TARGETS["compute_ops"]`` compute
ops, ``TARGETS["linalg_calls"]`` linear-algebra calls, ``TARGETS["host_reads"]`` host reads, and 72 adapters at
most ``TARGETS["doubling_growth"]`` more ops than 36.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .counts import format_counts
from .minilm import count_minilm_step

TARGETS = {"compute_ops": 300, "linalg_calls": 12, "host_reads": 0, "doubling_growth": 0.10}
OPTIMIZERS = ("adam", "sgd")
GROUPINGS = ("padded", "shape")            # the GPU's and the CPU's default grouping (TDLRTIntegrator "auto")
MODES = [(o, g) for g in GROUPINGS for o in OPTIMIZERS]
LAYERS, QUICK_LAYERS = (6, 12, 24, 48), (6, 12)
DISTINCT_RANKS, QUICK_DISTINCT_RANKS = (1, 2, 4, 8), (1, 8)


def check_targets(c36: dict, c72: dict) -> dict[str, dict]:
    """Each target -> ``{"value", "target", "ok"}`` from the counts at 36 and 72 adapters (``count_step`` dicts)."""
    growth = c72["compute_ops"] / c36["compute_ops"] - 1 if c36["compute_ops"] else float("inf")
    values = {"compute_ops": c36["compute_ops"], "linalg_calls": c36["linalg_calls"],
              "host_reads": max(c36["host_reads"], c72["host_reads"]), "doubling_growth": growth}
    return {k: {"value": v, "target": TARGETS[k], "ok": v <= TARGETS[k]} for k, v in values.items()}


def sweep(device: torch.device | str = "cpu", quick: bool = False) -> dict:
    """Every point for both optimizers; one intra-op thread while it runs (restored after)."""
    threads, start = torch.get_num_threads(), time.perf_counter()
    torch.set_num_threads(1)
    try:
        layers, ranks = (QUICK_LAYERS, QUICK_DISTINCT_RANKS) if quick else (LAYERS, DISTINCT_RANKS)
        results: dict = {"device": str(device), "torch": torch.__version__, "targets": TARGETS}
        results["against_adapters"] = [count_minilm_step(n, 8, o, device=device, grouping=g)
                                       for n in layers for o, g in MODES]
        results["against_ranks"] = [count_minilm_step(6, k, o, device=device, grouping=g)
                                    for k in ranks for o, g in MODES]
        results["steady_state"] = [count_minilm_step(6, 8, o, warmup_steps=2, device=device, grouping=g)
                                   for o, g in MODES]
        by = {(p["num_layers"], p["core_optimizer"], p["grouping"]): p for p in results["against_adapters"]}
        results["check"] = {f"{o} {g}": check_targets(by[6, o, g], by[12, o, g]) for o, g in MODES}
    finally:
        torch.set_num_threads(threads)
    results["wall_s"] = round(time.perf_counter() - start, 1)
    return results


def _table(points: list[dict], key: str) -> list[str]:
    head = " | ".join(f"{o} {g} {m}" for o, g in MODES for m in ("ops", "linalg", "host reads"))
    rows = [f"| {key.replace('_', ' ')} | {head} |", "|---:|" + "---:|" * 3 * len(MODES)]
    for value in dict.fromkeys(p[key] for p in points):
        cells = []
        for o, g in MODES:
            p = next(q for q in points if q[key] == value and q["core_optimizer"] == o and q["grouping"] == g)
            cells += [str(p["compute_ops"]), str(p["linalg_calls"]), str(p["host_reads"])]
        rows.append(f"| {value} | {' | '.join(cells)} |")
    return rows


def _label(p: dict) -> str:
    steady = f", after {p['warmup_steps']} steps" if p["warmup_steps"] else ""
    return (f"{p['num_adapters']} adapters, distinct ranks {p['distinct_ranks']}, {p['core_optimizer']}, "
            f"{p['grouping']}{steady}")


def markdown(results: dict) -> str:
    t = results["targets"]
    lines = [f"Integrator step counts on the MiniLM-shaped model (device {results['device']}, torch "
             f"{results['torch']}; one counted step per point, {results['wall_s']} s in all). Targets per step, "
             f"6 layers (36 adapters) with mixed ranks: <= {t['compute_ops']} compute ops, <= {t['linalg_calls']} "
             f"linear-algebra calls, {t['host_reads']} host reads, +<= {100 * t['doubling_growth']:.0f} % ops "
             "from 36 to 72 adapters. Grouping \"padded\" is what a GPU step runs, \"shape\" what a CPU step runs.",
             "", "| target | " + " | ".join(results["check"]) + " |", "|---|" + "---|" * len(results["check"])]
    for name in t:
        cells = []
        for mode in results["check"]:
            c = results["check"][mode][name]
            value = f"{100 * c['value']:+.1f} %" if name == "doubling_growth" else str(c["value"])
            cells.append(f"{value} ({'ok' if c['ok'] else 'FAIL'})")
        lines.append(f"| {name} | {' | '.join(cells)} |")
    lines += ["", "Against the number of adapters (8 distinct ranks):", ""]
    lines += _table(results["against_adapters"], "num_adapters")
    lines += ["", "Against the number of distinct ranks (36 adapters):", ""]
    lines += _table(results["against_ranks"], "distinct_ranks")
    lines += ["", "By name:", ""]
    points = results["against_adapters"] + results["against_ranks"] + results["steady_state"]
    lines += [format_counts([(_label(p), p) for p in points])]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, points in ((axes[0], "num_adapters", results["against_adapters"]),
                            (axes[1], "distinct_ranks", results["against_ranks"])):
        for (o, g), style in zip(MODES, ("-", "--", "-.", ":")):
            mine = [p for p in points if p["core_optimizer"] == o and p["grouping"] == g]
            x = [p[key] for p in mine]
            for metric, marker in (("compute_ops", "o"), ("linalg_calls", "s"), ("host_reads", "^")):
                ax.plot(x, [max(p[metric], 0.5) for p in mine], marker + style, label=f"{o} {g}: {metric}")
        for metric in ("compute_ops", "linalg_calls"):
            ax.axhline(results["targets"][metric], color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        x = sorted({p[key] for p in points})
        ax.set_xticks(x, [str(v) for v in x])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_yscale("log")
        ax.set_xlabel("adapters (8 distinct ranks)" if key == "num_adapters" else "distinct ranks (36 adapters)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("count per integrator step")
    fig.suptitle("TDLRT integrator step, MiniLM shape (dotted: targets of 300 compute ops and 12 linalg calls; "
                 "host reads: 0, drawn at 0.5)", fontsize=9)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(results: dict, output_dir: Path) -> str:
    """counts.json, counts.md, counts.png in ``output_dir``; returns the markdown."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "counts.json").write_text(json.dumps(results, indent=2))
    plot(results, output_dir / "counts.png")
    table = markdown(results)
    (output_dir / "counts.md").write_text(table + "\n")
    return table
