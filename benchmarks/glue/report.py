"""Summaries of the run JSONs in an output folder: a Markdown table (mean ± std over seeds) and two plots."""

import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..rank_history import plot_rank_history
from .args import METHODS
from .data import task_to_keys

_RUN_KEYS = {"task", "method", "seed", "metrics", "trainable_params"}


def load_results(output_dir) -> list[dict]:
    """Every run record (JSON with task, method, seed, metrics, ...) in ``output_dir``."""
    results = []
    for path in sorted(Path(output_dir).glob("*.json")):
        record = json.loads(path.read_text())
        if isinstance(record, dict) and _RUN_KEYS <= record.keys():
            results.append(record)
    return results


def _groups(results: list[dict]) -> dict:
    """(task label, method) -> runs sorted by seed; GLUE's task order, then tdlrt, lora, adalora, full."""
    groups = defaultdict(list)
    for r in results:
        label = r["task"] if r.get("dataset", "glue") == "glue" else f"{r['task']} [{r['dataset']}]"
        groups[(label, r["method"])].append(r)

    def order(key):
        runs = groups[key]
        task, method = runs[0]["task"], runs[0]["method"]
        return (_index(task_to_keys, task), key[0], _index(METHODS, method), method)

    return {k: sorted(groups[k], key=lambda r: r["seed"]) for k in sorted(groups, key=order)}


def _index(names, name) -> int:
    names = list(names)
    return names.index(name) if name in names else len(names)


def _mean_std(values) -> tuple:
    values = np.asarray([v for v in values if v is not None], dtype=float)
    if values.size == 0:
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0


def _fmt(values, scale: float = 100.0) -> str:
    mean, std = _mean_std(values)
    return f"{mean * scale:.2f}" if len(values) < 2 else f"{mean * scale:.2f} ± {std * scale:.2f}"


def _count(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def markdown_table(results: list[dict]) -> str:
    """One row per task and method; scores ×100 as in the papers' tables."""
    lines = ["| Task | Method | Seeds | Score (×100) | All metrics (×100) | Trainable params | Rank changes "
             "after 10 % | Train s | Peak MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for (task, method), runs in _groups(results).items():
        names = list(runs[0]["metrics"])
        main = runs[0].get("main_metric", names[0])
        metrics = "; ".join(f"{n} {_fmt([r['metrics'][n] for r in runs])}" for n in names)
        params = _count(_mean_std([r["trainable_params"] for r in runs])[0])
        seconds = _mean_std([r.get("train_seconds") for r in runs])[0]
        memory = _mean_std([r.get("peak_memory_mb") for r in runs])[0]
        score = _fmt([r["metrics"][main] for r in runs])
        late = [r.get("rank_changes_after_10pct") for r in runs]
        late = "–" if None in late else f"{_mean_std(late)[0]:.1f}"
        lines.append(f"| {task} | {method} | {len(runs)} | {main} {score} | {metrics} | {params} | {late} | "
                     f"{seconds:.0f} | {memory:.0f} |")
    return "\n".join(lines)


def plot_rank_evolution(results: list[dict], output_dir) -> list[Path]:
    """Per task and rank-adaptive method (first seed): each module's rank over training, active params."""
    paths = []
    for (task, method), runs in _groups(results).items():
        history = runs[0].get("rank_history")
        if not history:
            continue
        path = Path(output_dir) / f"ranks_{re.sub(r'[^A-Za-z0-9]+', '_', task).strip('_')}_{method}.png"
        paths.append(plot_rank_history(history, f"{task} · {method} · seed {runs[0]['seed']}: rank per module "
                                       "over training", path))
    return paths


def plot_score_vs_params(results: list[dict], output_dir) -> Path | None:
    """Main score (mean ± std over seeds) against trainable parameters, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(results)
    tasks = list(dict.fromkeys(task for task, _ in groups))
    if not tasks:
        return None
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for (t, method), runs in groups.items():
            if t != task:
                continue
            main = runs[0].get("main_metric", next(iter(runs[0]["metrics"])))
            x, dx = _mean_std([r["trainable_params"] for r in runs])
            y, dy = _mean_std([r["metrics"][main] for r in runs])
            ax.errorbar(x, 100 * y, xerr=dx, yerr=100 * dy, fmt="o", capsize=3, label=method)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(f"{main} (×100)")
        ax.set_title(task)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(output_dir) / "score_vs_params.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(output_dir) -> str:
    """Write ``results.md`` and the plots for every run JSON in ``output_dir``; return the table."""
    results = load_results(output_dir)
    table = markdown_table(results)
    plots = [*plot_rank_evolution(results, output_dir), plot_score_vs_params(results, output_dir)]
    links = "\n".join(f"![{p.stem}]({p.name})" for p in plots if p is not None)
    Path(output_dir, "results.md").write_text(f"# GLUE runner results\n\n{table}\n\n{links}\n")
    return table
