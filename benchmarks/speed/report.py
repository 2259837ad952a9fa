"""Tables (console and markdown), the JSON and the PNG of integrator cost against rank and adapter count."""

from __future__ import annotations

import json
from pathlib import Path

from .counts import names
from .training import PHASES

MIB = 2**20


def _cells(a: float, b: float, digits: int = 1, with_ratio: bool = True) -> str:
    ratio = f"{b / a:.3f}" if a > 0 and with_ratio else ""
    return f"{a:.{digits}f} | {b:.{digits}f} | {ratio}"


def training_table(result: dict, cpu_columns: bool) -> list[str]:
    """Medians per phase (wall clock and, on CPU, process CPU time), memory and the integrator's share."""
    lora, tdlrt, ratio = result["lora"], result["tdlrt"], result["ratio"]
    ranks = result["tdlrt_ranks"]
    extra = " LoRA CPU | TDLRT CPU | TDLRT / LoRA |" if cpu_columns else ""
    rows = [f"**{result['workload']}** ({result['num_adapters']} adapters; {result['steps']} timed steps after "
            f"{result['warmup']} warm-up; TDLRT ranks during timing: min {ranks['min']:.0f}, mean {ranks['mean']:.2f}, "
            f"max {ranks['max']:.0f})", "",
            "| ms, median | LoRA | TDLRT | TDLRT / LoRA |" + extra,
            "|---|---:|---:|---:|" + ("---:|" * 3 * cpu_columns)]
    for phase in PHASES:
        show = phase != "integrator"       # LoRA has none: only the two clock reads
        row = f"| {phase} | {_cells(lora['median_s'][phase] * 1e3, tdlrt['median_s'][phase] * 1e3, 1, show)} |"
        if cpu_columns:
            row += f" {_cells(lora['median_cpu_s'][phase] * 1e3, tdlrt['median_cpu_s'][phase] * 1e3, 1, show)} |"
        rows.append(row)
    blank = " | | |" if cpu_columns else ""
    rows.append(f"| total: median of per-step ratios | | | {ratio['total_paired_median']:.3f} |" + blank)
    for key, label in (("resident", "resident at step start"), ("step_growth", "peak growth during the step"),
                       ("peak", "peak memory")):
        rows.append(f"| {label} (MiB) | {_cells(lora['memory_bytes'][key] / MIB, tdlrt['memory_bytes'][key] / MIB)} |"
                    + blank)
    share = f" | {100 * result['integrator_share_cpu']:.2f} % | |" if cpu_columns else ""
    rows.append(f"| integrator share of the TDLRT step | | {100 * result['integrator_share']:.2f} % | |" + share)
    counts = result["tdlrt"].get("integrator_counts")
    if counts:
        rows.append(f"| integrator step: compute ops / linalg calls / host reads | | {counts_cell(counts)} | |"
                    + blank)
        rows += ["", f"Integrator step by name: linear algebra {names(counts['linalg'])}; host reads "
                 f"{names(counts['host_read_ops'])}" + (f"; CUDA syncs {counts['cuda_syncs']}"
                                                        if counts.get("cuda_syncs") is not None else "")]
    return rows


def counts_cell(counts: dict) -> str:
    return f"{counts['compute_ops']} / {counts['linalg_calls']} / {counts['host_reads']}"



def scaling_table(points: list[dict], key: str, cpu_columns: bool) -> list[str]:
    extra = " batched CPU | per-adapter CPU | speed-up |" if cpu_columns else ""
    rows = [f"| {key} | batched (ms) | per-adapter (ms) | speed-up |" + extra
            + " batched: ops / linalg / host reads |",
            "|---:|---:|---:|---:|" + ("---:|" * 3 * cpu_columns) + "---:|"]
    for p in points:
        row = (f"| {p[key]} | {p['batched_s'] * 1e3:.1f} | {p['per_adapter_s'] * 1e3:.1f} | "
               f"{p['per_adapter_s'] / p['batched_s']:.2f}x |")
        if cpu_columns:
            row += (f" {p['batched_cpu_s'] * 1e3:.1f} | {p['per_adapter_cpu_s'] * 1e3:.1f} | "
                    f"{p['per_adapter_cpu_s'] / p['batched_cpu_s']:.2f}x |")
        rows.append(row + (f" {counts_cell(p['counts'])} |" if "counts" in p else " |"))
    return rows


def markdown(results: dict) -> str:
    s = results["settings"]
    cpu = s["device"] == "cpu"
    lines = [f"Device: {s['device_name']}; torch {s['torch']}; intra-op threads {s['threads']} (the integrator's "
             f"linear algebra: {s['integrator_threads']}); load average before/after {s['load_before']} / "
             f"{s['load_after']}; command: `{s['command']}`", ""]
    for name in ("deberta", "vgg16"):
        if name in results["training"]:
            lines += training_table(results["training"][name], cpu) + [""]
    if "conv_skipped" in results:
        lines += [results["conv_skipped"], ""]
    if "scaling" in results:
        sweep = results["scaling"]
        lines += ["**Integrator step alone** (Adam core, ranks pinned; medians)", ""]
        lines += [f"against the number of adapters (rank {sweep['against_adapters'][0]['rank']}):", ""]
        lines += scaling_table(sweep["against_adapters"], "num_adapters", cpu) + [""]
        lines += [f"against the rank ({sweep['against_rank'][0]['num_adapters']} adapters, r_max = 4 r):", ""]
        lines += scaling_table(sweep["against_rank"], "rank", cpu) + [""]
    return "\n".join(lines)


def plot(scaling: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, points in ((axes[0], "num_adapters", scaling["against_adapters"]),
                            (axes[1], "rank", scaling["against_rank"])):
        x = [p[key] for p in points]
        for mode, style in (("batched", "o-"), ("per_adapter", "s--")):
            ax.plot(x, [p[f"{mode}_s"] * 1e3 for p in points], style, label=mode.replace("_", "-"))
        ax.set_xlabel("adapters" if key == "num_adapters" else "rank r (r_max = 4 r)")
        ax.set_ylabel("integrator step (ms, median)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    axes[0].set_title(f"rank {scaling['against_adapters'][0]['rank']}")
    axes[1].set_title(f"{scaling['against_rank'][0]['num_adapters']} adapters")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(results: dict, output_dir: Path) -> str:
    output_dir.mkdir(parents=True, exist_ok=True)
    tag = results["settings"]["device"]
    (output_dir / f"speed_{tag}.json").write_text(json.dumps(results, indent=2))
    if "scaling" in results:
        plot(results["scaling"], output_dir / f"integrator_scaling_{tag}.png")
    table = markdown(results)
    (output_dir / f"speed_{tag}.md").write_text(table + "\n")
    return table
