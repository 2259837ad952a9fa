"""Accuracy against trainable parameters (issue #16, part 5): LoRA at several ranks, AdaLoRA at TDLRT's budget,
TDLRT at its defaults, a tau grid and parameter budgets; one runner process per (point, seed), JOBS at a time.

    OMP_NUM_THREADS=1 python -m benchmarks.glue.frontier OUT [--jobs 2] [--seeds 0 1 2] [--points a,b] \
        [--selection_flags FLAGS] [--report-only] -- <runner flags of every point, e.g. --preset offline-full>

AdaLoRA's learning rate is chosen first, on the first seed's validation accuracy (issue #16: at LoRA's rate it
stays at the majority class; a tie goes to the smaller rate), in ``adalora_r4_lr*_select/``. Where the reported
dataset has no validation split, ``--selection_flags`` gives the selection runs a tuning dataset. ``adalora_r4/``
then holds every seed at the chosen rate. Budgets are fractions of LoRA r=8's adapter parameters, counted on the model.
``OUT/frontier.md`` and ``OUT/frontier.png`` cover every finished run, so a stopped sweep still reports what it
measured; a restarted one runs only what is missing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import ROTTEN_TOMATOES_TUNING
from .rank_ablation import fmt, load

ADALORA_LRS = (3e-3, 1e-2)
BUDGET_FRACTIONS = (0.25, 0.5, 0.7)


@dataclass
class Point:
    name: str  # the folder under OUT
    method: str
    flags: list[str]
    seeds: list[int] = field(default_factory=list)


def lora_shape(base: list[str]) -> dict:
    """LoRA r=8's adapter parameters (8 x (in + out) per adapted linear) and the head's, on the runner's model."""
    import transformers

    from .args import parse_args
    from .methods import default_target_modules, head_modules, load_backbone

    args = parse_args([*base, "--method", "lora"])
    transformers.logging.set_verbosity_error()  # the load report of the fresh head
    model = load_backbone(args.model.model, args.data.task[0], 0.0)
    targets = args.model.target_modules or default_target_modules(model)
    modules = dict(model.named_modules())
    adapter = sum(8 * (modules[t].in_features + modules[t].out_features) for t in targets)
    heads = set(head_modules(model))
    head = sum(p.numel() for n, p in model.named_parameters() if heads & set(n.split(".")))
    return {"lora_r8_adapter_params": adapter, "head_params": head}


ADALORA = ["--method", "adalora", "--adalora_target_r", "4", "--adalora_init_r", "6"]  # ~50 % of LoRA r=8


def grid(seeds: list[int], lora_r8: int, selection: list[str] = ()) -> list[Point]:
    """Every point but AdaLoRA's reported one (it follows the choice), most important first: a stopped sweep keeps
    those. ``selection``: runner flags of the AdaLoRA selection runs only (e.g. a tuning dataset)."""
    s = list(seeds)
    ada = [Point(f"adalora_r4_lr{lr:g}_select", "adalora", [*ADALORA, "--learning_rate", f"{lr:g}", *selection],
                 s[:1]) for lr in ADALORA_LRS]
    budgets = {f: Point(f"tdlrt_budget{round(100 * f)}", "tdlrt",
                        ["--method", "tdlrt", "--target_params", str(round(f * lora_r8))], s) for f in BUDGET_FRACTIONS}
    return [*ada, Point("lora_r8", "lora", ["--method", "lora", "--lora_r", "8"], s), budgets[0.5],
            Point("tdlrt_defaults", "tdlrt", ["--method", "tdlrt"], s),
            Point("tdlrt_defaults_frozen25", "tdlrt", ["--method", "tdlrt", "--rank_freeze_fraction", "0.25"], s),
            *(Point(f"lora_r{r}", "lora", ["--method", "lora", "--lora_r", str(r)], s) for r in (4, 2, 16)),
            budgets[0.25], budgets[0.7],
            *(Point(f"tdlrt_tau{t}", "tdlrt", ["--method", "tdlrt", "--tau", t], s) for t in ("0.2", "0.6"))]


def validation_score(folder: Path) -> float:
    """A selection run's validation accuracy (on a tuning dataset, its accuracy); refused when the only held-out
    split is the reported one."""
    (run, *_) = load(str(folder))
    if run.get("dataset") == ROTTEN_TOMATOES_TUNING:  # scored on tuning movies: the split to choose on
        return run["metrics"]["accuracy"]
    if "validation_accuracy" not in run["metrics"]:
        raise SystemExit(f"frontier: {folder.name} has no validation split to choose AdaLoRA's learning rate on "
                         f"(its only held-out split is the reported one): pass a tuning dataset, e.g. "
                         f"--selection_flags='--dataset {ROTTEN_TOMATOES_TUNING}'")
    return run["metrics"]["validation_accuracy"]


def chosen_adalora(out: Path) -> float | None:
    """AdaLoRA's learning rate with the best selection-run validation accuracy (a tie: the smaller rate), once every
    selection run is done."""
    folders = {lr: out / f"adalora_r4_lr{lr:g}_select" for lr in ADALORA_LRS}
    if not all(load(str(f)) for f in folders.values()):
        return None
    return max(folders, key=lambda lr: (validation_score(folders[lr]), -lr))


def sweep(out: Path, base: list[str], points: list[Point], seeds: list[int], jobs: int,
          same_data: bool = True) -> list[str]:
    """Run every (point, seed) without a JSON yet, ``jobs`` processes at a time; AdaLoRA's reported runs follow its
    choice (``same_data``: the selection ran on the reported data, so its run is reused). Returns the failed runs."""
    pending = [(p, s) for p in points for s in p.seeds]
    ada_queued = not any(p.method == "adalora" for p in points)
    running: list[tuple[subprocess.Popen, str]] = []
    failed = []
    while pending or running or not ada_queued:
        failed += [f"{label} (see {label.replace(' ', '_seed')}.log)" for proc, label in running
                   if proc.poll() not in (None, 0)]
        running = [(proc, label) for proc, label in running if proc.poll() is None]
        if not ada_queued and (lr := chosen_adalora(out)) is not None:
            print(f"AdaLoRA learning rate chosen on validation: {lr:g}", flush=True)
            point = Point("adalora_r4", "adalora", [*ADALORA, "--learning_rate", f"{lr:g}"], seeds)
            if same_data:  # the selection run is this point's first seed: the same command
                (out / point.name).mkdir(exist_ok=True)
                for run in (out / f"adalora_r4_lr{lr:g}_select").glob("*.json"):
                    shutil.copy2(run, out / point.name / run.name)
            pending = [(point, s) for s in seeds] + pending  # ahead of the less important points
            ada_queued = True
        while pending and len(running) < jobs:
            point, seed = pending.pop(0)
            folder = out / point.name
            if any(r["seed"] == seed for r in load(str(folder))):
                continue  # already measured: a restarted sweep only runs what is missing
            folder.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "benchmarks.glue", *base, *point.flags, "--seeds", str(seed),
                   "--output_dir", str(folder)]
            log = open(out / f"{point.name}_seed{seed}.log", "w")  # noqa: SIM115 (closed with the process)
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), f"{point.name} {seed}"))
            print(f"started {point.name} seed {seed}", flush=True)
        if not pending and not running and not ada_queued and chosen_adalora(out) is None:
            break
        time.sleep(5)
    return failed


def report(out: Path) -> str:
    """``frontier.md`` (one row per point) and ``frontier.png`` (reported accuracy against trainable parameters)."""
    meta = json.loads((out / "frontier.json").read_text())
    head, lora_r8 = meta["head_params"], meta["lora_r8_adapter_params"]
    variants = {f.name: runs for f in sorted(out.iterdir())
                if f.is_dir() and not f.name.endswith("_select") and (runs := load(str(f)))}
    head_row = ("| Point | Method | Seeds | Accuracy, reported split (×100) | Validation acc. (×100) | Trainable "
                "| Adapter params | vs LoRA r=8 adapter | Mean rank | Rank changes after 10 % | Reported, per seed |")
    lines = [head_row, "|" + "---|" * (head_row.count("|") - 1)]
    for name, runs in sorted(variants.items(), key=lambda kv: np.mean([r["trainable_params"] for r in kv[1]])):
        trainable = float(np.mean([r["trainable_params"] for r in runs]))
        ranks = [np.mean([max(v) for v in r["ranks"].values()]) for r in runs if r.get("ranks")]
        changes = [r.get("rank_changes_after_10pct") for r in runs if r.get("rank_changes_after_10pct") is not None]
        lines.append(" | ".join([
            f"| {name}", runs[0]["method"], ", ".join(str(r["seed"]) for r in runs),
            fmt([r["metrics"]["accuracy"] for r in runs]),
            fmt([r["metrics"]["validation_accuracy"] for r in runs]) if "validation_accuracy" in runs[0]["metrics"]
            else "–",
            f"{trainable / 1e3:.1f}K", f"{(trainable - head) / 1e3:.1f}K",
            f"{100 * (trainable - head) / lora_r8:.0f} %",
            f"{np.mean(ranks):.1f}" if ranks else "–", f"{np.mean(changes):.1f}" if changes else "–",
            " / ".join(f"{100 * r['metrics']['accuracy']:.2f}" for r in runs)]) + " |")
    selection = [f"{f.name.removesuffix('_select')}: {100 * validation_score(f):.2f}"
                 for f in sorted(out.glob("adalora_r4_lr*_select")) if f.is_dir() and load(str(f))]
    chosen = chosen_adalora(out)
    where = f"with `{' '.join(meta['selection'])}`" if meta["selection"] else "the reported dataset's validation split"
    text = "\n".join(lines) + (f"\n\nAdaLoRA learning rate (chosen: {f'{chosen:g}' if chosen else 'pending'}); "
                               f"validation accuracy of the selection runs ({where}): "
                               + "; ".join(selection) if selection else "")
    (out / "frontier.md").write_text(f"# Frontier\n\nRunner flags: `{' '.join(meta['base'])}`. Head: {head:,} "
                                     f"parameters (trained in full by every method). LoRA r=8 adapter: "
                                     f"{lora_r8:,}.\n\n{text}\n\n![frontier](frontier.png)\n")
    _plot(variants, out / "frontier.png")
    return text


def _plot(variants: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"lora": ("C1", "s"), "adalora": ("C2", "^"), "tdlrt": ("C0", "o")}
    for i, (name, runs) in enumerate(sorted(variants.items(), key=lambda kv: kv[1][0]["trainable_params"])):
        color, marker = styles.get(runs[0]["method"], ("C3", "x"))
        x = [r["trainable_params"] for r in runs]
        y = [100 * r["metrics"]["accuracy"] for r in runs]
        ax.errorbar(np.mean(x), np.mean(y), yerr=np.std(y, ddof=1) if len(y) > 1 else 0, fmt=marker, color=color,
                    capsize=3)
        ax.annotate(name.removeprefix(runs[0]["method"] + "_"), (np.mean(x), np.mean(y)), fontsize=7,
                    xytext=(4, 3 if i % 2 else -9), textcoords="offset points")  # alternate: neighbours overlap
    for method, (color, marker) in styles.items():
        ax.plot([], [], marker, color=color, label=method)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (active, head included)")
    ax.set_ylabel("accuracy on the reported split (×100), mean ± std")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    own, base = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(prog="python -m benchmarks.glue.frontier", description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--points", default=None, help="Comma-separated point names (default: all).")
    parser.add_argument("--selection_flags", default="", help=(
        "Runner flags of the AdaLoRA learning-rate selection runs only, e.g. '--dataset rotten_tomatoes_tuning' "
        "for a dataset whose only held-out split is the reported one."))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(own)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    if not args.report_only:
        meta = {"base": base, "selection": args.selection_flags.split(), **lora_shape(base)}
        (out / "frontier.json").write_text(json.dumps(meta, indent=1))
        points = grid(args.seeds, meta["lora_r8_adapter_params"], meta["selection"])
        if args.points:
            points = [p for p in points if p.name in args.points.split(",")]
        failed = sweep(out, base, points, args.seeds, args.jobs, same_data=not meta["selection"])
    print(report(out))
    if failed:
        print(f"frontier: {len(failed)} run(s) failed: {'; '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
