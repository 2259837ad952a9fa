"""``results.md`` (mean ± std over seeds per method and size), ``subject_loss_vs_params.png`` and
``samples.png`` (a row of samples from the base model and from each adapter) from the run JSONs of a folder."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..rank_history import plot_rank_history
from .methods import METHODS, SIZE_NAME

RUN_KEYS = {"method", "seed", "trainable_params", "subject_loss", "prior_loss_before", "prior_loss_after",
            "train_seconds", "ranks"}
PARAMS_RATIO = 0.6        # the target: TDLRT with at most 60 % of the best LoRA's trainable parameters


def load_runs(output_dir: Path) -> list[dict]:
    runs = []
    for path in sorted((Path(output_dir) / "runs").glob("*.json")):
        record = json.loads(path.read_text())
        if isinstance(record, dict) and RUN_KEYS <= record.keys():
            runs.append(record)
    return runs


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (method, size): means and standard deviations over the seeds."""
    groups = defaultdict(list)
    for r in runs:
        groups[(r["method"], r[SIZE_NAME[r["method"]]])].append(r)
    rows = []
    for (method, size), rs in groups.items():
        drift = [r["prior_loss_after"] - r["prior_loss_before"] for r in rs]
        rows.append({"method": method, "size": size, "seeds": len(rs),
                     "params": _mean_std([r["trainable_params"] for r in rs]),
                     "subject": _mean_std([r["subject_loss"] for r in rs]), "drift": _mean_std(drift),
                     "subject_by_seed": {r["seed"]: r["subject_loss"] for r in rs},
                     "per_image_by_seed": {r["seed"]: r["subject_loss_per_image"] for r in rs
                                           if "subject_loss_per_image" in r},
                     "subject_before": rs[0].get("subject_loss_before"), "prior_before": rs[0]["prior_loss_before"],
                     "seconds": _mean_std([r["train_seconds"] for r in rs])})
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(rows, key=lambda row: (order.get(row["method"], len(order)), row["size"]))


def _mean_std(values) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def _pm(stat: tuple[float, float], digits: int = 4) -> str:
    return f"{stat[0]:.{digits}f} ± {stat[1]:.{digits}f}"


def _count(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def target_verdict(rows: list[dict]) -> str:
    """TDLRT vs the best LoRA rank: subject loss at least as low, at most 60 % of its parameters, drift no worse."""
    lora = [r for r in rows if r["method"] == "lora"]
    tdlrt = [r for r in rows if r["method"] == "tdlrt"]
    if not lora or not tdlrt:
        return "Target check needs both TDLRT and LoRA runs."
    best = min(lora, key=lambda r: r["subject"][0])
    lines = [f"Best LoRA rank: r={best['size']:g} (subject loss {_pm(best['subject'])}, "
             f"{_count(best['params'][0])} params, prior drift {best['drift'][0]:+.4f})."]
    for r in tdlrt:
        ratio = r["params"][0] / best["params"][0]
        checks = {"loss ≤ best LoRA": r["subject"][0] <= best["subject"][0],
                  f"params ≤ {PARAMS_RATIO:.0%}": ratio <= PARAMS_RATIO,
                  "drift ≤ LoRA's": r["drift"][0] <= best["drift"][0]}
        verdict = "**met**" if all(checks.values()) else "not met (" + ", ".join(
            k for k, ok in checks.items() if not ok) + " fails)"
        lines.append(f"- TDLRT tau={r['size']:g}: subject loss {_pm(r['subject'])}, {ratio:.0%} of its params, "
                     f"drift {r['drift'][0]:+.4f}: {verdict}.{paired_difference(r, best)}")
    return "\n".join(lines)


def paired_difference(row: dict, best: dict) -> str:
    """TDLRT - LoRA per shared seed. A seed fixes the batches, noise and timesteps of both runs, and its effect on
    the loss is shared by the methods (it is larger than the gap between them), so the per-seed difference is the
    sharper comparison of the two; '' with fewer than two shared seeds. With per-image losses, also the standard
    error of the mean difference over the scored images (:func:`image_standard_error`)."""
    seeds = sorted(row["subject_by_seed"].keys() & best["subject_by_seed"].keys())
    if len(seeds) < 2:
        return ""
    diffs = [row["subject_by_seed"][s] - best["subject_by_seed"][s] for s in seeds]
    lower = sum(d < 0 for d in diffs)
    text = (f" Paired by seed, TDLRT - LoRA: {_pm(_mean_std(diffs))} ({lower} of {len(seeds)} seeds lower: "
            + ", ".join(f"{d:+.4f}" for d in diffs) + ").")
    se = image_standard_error(row.get("per_image_by_seed", {}), best.get("per_image_by_seed", {}), seeds)
    return text if se is None else text + f" Standard error over the {se[1]} scored images: {se[0]:.4f}."


def image_standard_error(a: dict, b: dict, seeds: list) -> tuple[float, int] | None:
    """How much the mean paired difference depends on which images were scored: the per-image difference
    ``a - b`` averaged over the seeds, its standard deviation over the N images / sqrt(N); with N. None without
    per-image losses for every seed, or with different image counts."""
    if not all(s in a and s in b and len(a[s]) == len(b[s]) for s in seeds):
        return None
    d = np.mean([np.asarray(a[s], dtype=float) - np.asarray(b[s], dtype=float) for s in seeds], axis=0)   # (N,)
    return (float(d.std(ddof=1) / np.sqrt(d.size)), int(d.size)) if d.size > 1 else None


def write_report(output_dir: Path) -> str:
    output_dir = Path(output_dir)
    rows = summarize(load_runs(output_dir))
    if not rows:
        return "no runs"
    head = ("| method | size | seeds | trainable params | subject loss | prior drift (after - before) | "
            "train s |\n|---|---|---|---|---|---|---|")
    body = [f"| {r['method']} | {SIZE_NAME[r['method']]}={r['size']:g} | {r['seeds']} | {_count(r['params'][0])} "
            f"| {_pm(r['subject'])} | {r['drift'][0]:+.4f} ± {r['drift'][1]:.4f} | {r['seconds'][0]:.1f} |"
            for r in rows]
    base = rows[0]
    text = "\n".join([
        "# Dreambooth: subject loss vs trainable parameters", "",
        "Denoising MSE at fixed timesteps and noise (lower is better): subject loss on the validation images "
        "with the instance prompt; prior drift = change of the loss on the prior-evaluation images with the "
        "class prompt. Mean ± std over seeds.", "",
        f"Base model: subject loss {base['subject_before']:.4f}, prior loss {base['prior_before']:.4f}.", "",
        head, *body, "", target_verdict(rows), ""])
    (output_dir / "results.md").write_text(text)
    plot_losses(rows, output_dir / "subject_loss_vs_params.png")
    for run in load_runs(output_dir):                  # the rank-per-layer plot of each TDLRT run
        if run.get("rank_history"):
            plot_rank_history(run["rank_history"], f"dreambooth · tdlrt tau={run.get('tau')} · seed {run['seed']}: "
                              f"rank per layer ({run['rank_changes_after_10pct']} changes after 10 %)",
                              output_dir / f"ranks_tdlrt_tau{run.get('tau')}_seed{run['seed']}.png")
    sample_grid(output_dir / "samples", [f"{r['method']}_{SIZE_NAME[r['method']]}{r['size']:g}" for r in rows],
                output_dir / "samples.png")
    return text


def plot_losses(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        rs.sort(key=lambda r: r["params"][0])
        ax.errorbar([r["params"][0] for r in rs], [r["subject"][0] for r in rs],
                    yerr=[r["subject"][1] for r in rs], marker="o", capsize=3, label=method)
        for r in rs:
            ax.annotate(f"{SIZE_NAME[method]}={r['size']:g}", (r["params"][0], r["subject"][0]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    if rows[0]["subject_before"] is not None:
        ax.axhline(rows[0]["subject_before"], color="gray", linestyle=":", label="base model")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("subject loss (denoising MSE)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sample_grid(folder: Path, prefixes: list[str], path: Path) -> None:
    """One row per model (base first): the sample PNGs written by the runs (first seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    rows = [("base", folder / "base")]
    for prefix in prefixes:
        match = sorted(p for p in folder.glob(f"{prefix}_seed*") if p.is_dir())
        if match:
            rows.append((prefix, match[0]))
    images = [[np.asarray(Image.open(p)) for p in sorted(d.glob("*.png"))] for _, d in rows]
    cols = max((len(r) for r in images), default=0)
    if not cols:
        return
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.2 * cols + 1.5, 1.2 * len(rows)), squeeze=False)
    for i, ((label, _), row) in enumerate(zip(rows, images)):
        for j in range(cols):
            ax = axes[i][j]
            ax.axis("off")
            if j < len(row):
                ax.imshow(row[j], cmap="gray" if row[j].ndim == 2 else None, vmin=0, vmax=255)
        axes[i][0].text(-0.1, 0.5, label, transform=axes[i][0].transAxes, ha="right", va="center", fontsize=8)
    fig.subplots_adjust(left=0.3, wspace=0.05, hspace=0.05)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
