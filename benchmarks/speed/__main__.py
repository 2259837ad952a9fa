"""``python -m benchmarks.speed [--quick] [--device cuda] [--counts]``: TDLRT against LoRA per training step.

Every run also counts what one integrator step dispatches (compute ops, linear-algebra calls, host reads;
``counts.py``). ``--counts`` runs only the step-count sweep of issue #13 (``count_sweep.py``). See ``--help``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__)
    p.add_argument("--device", default="cpu", help="cpu or cuda (timed with synchronisation, CUDA memory stats)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 layers, 2 timed steps, small sweeps")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's default)")
    p.add_argument("--layers", type=int, default=12, help="DeBERTa encoder layers (6 adapters each)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--conv-batch-size", type=int, default=128,
                   help="VGG16 batch (32x32 images; 128 is the usual CIFAR-10 batch; --quick: 16)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per method (default 5 on cpu, 20 on cuda)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--r", type=int, default=8, help="LoRA rank and TDLRT initial rank")
    p.add_argument("--r-min", type=int, default=8, help="TDLRT r_min (8 with tau 0.9 keeps the ranks at 8)")
    p.add_argument("--r-max", type=int, default=32)
    p.add_argument("--tau", type=float, default=0.9,
                   help="TDLRT tolerance; 0.9 truncates back to r_min at every step, so TDLRT times the work of rank "
                        "r against LoRA r (tau 0.5 let some DeBERTa adapters keep 9 directions)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--profile", action="store_true",
                   help="also write a torch.profiler table of one step per method (profile_*.txt)")
    p.add_argument("--skip", nargs="*", default=[], choices=["deberta", "vgg16", "scaling"])
    p.add_argument("--counts", action="store_true",
                   help="only the integrator step-count sweep (MiniLM shape: 36-288 adapters, 1-8 distinct ranks, "
                        "adam and sgd) against the issue-13 targets: counts.md / counts.json / counts.png")
    p.add_argument("--output-dir", type=Path, default=Path("outputs/speed"))
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.warmup, args.conv_batch_size = min(args.layers, 2), 1, min(args.conv_batch_size, 16)
        args.steps = args.steps or 2
    args.steps = args.steps or (20 if args.device.startswith("cuda") else 5)
    return args


def settings(args, device) -> dict:
    import torch

    return {"device": device.type, "torch": torch.__version__, "python": platform.python_version(),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
            f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)",
            "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "integrator_threads": 1 if device.type == "cpu" else "n/a (GPU)",
            "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")},
            "load_before": [round(x, 2) for x in os.getloadavg()],
            "command": "python -m benchmarks.speed " + shlex.join(sys.argv[1:]), "quick": args.quick}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    import torch
    import transformers

    from . import report
    from .scaling import sweep
    from .training import compare, deberta_workload, vgg_workload

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks.speed: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if args.counts:
        from . import count_sweep

        table = count_sweep.write(count_sweep.sweep(device, args.quick), args.output_dir)
        print(table)
        print(f"\ncounts.json, counts.md and counts.png in {args.output_dir}/")
        return 0
    results: dict = {"settings": settings(args, device), "args": {k: str(v) for k, v in vars(args).items()},
                     "training": {}}
    start = time.perf_counter()
    if "deberta" not in args.skip:
        results["training"]["deberta"] = compare(deberta_workload(args.layers, args.batch_size, args.seq_len),
                                                 args, device)
    if "vgg16" not in args.skip:
        try:
            import tdrlt_peft.layers.conv  # noqa: F401  (Tucker conv adapters)
        except ImportError:
            results["conv_skipped"] = "Tucker conv adapters (tdrlt_peft/conv.py) are not available: VGG skipped."
        else:
            results["training"]["vgg16"] = compare(vgg_workload(args.conv_batch_size), args, device)
    if "scaling" not in args.skip:
        counts, ranks = ([12, 24], [4, 8]) if args.quick else ([12, 24, 48, 72, 144], [4, 8, 16, 32, 64])
        results["scaling"] = sweep(counts, ranks, base_adapters=24 if args.quick else 72, base_rank=8, device=device,
                                   warmup=1, steps=2 if args.quick else 5)
    if args.profile and "scaling" not in args.skip:
        from .scaling import profile_integrator

        args.output_dir.mkdir(parents=True, exist_ok=True)
        table = profile_integrator(24 if args.quick else 72, 8, device)
        (args.output_dir / f"profile_integrator_{device.type}.txt").write_text(table)
    results["settings"]["load_after"] = [round(x, 2) for x in os.getloadavg()]
    results["settings"]["wall_s"] = round(time.perf_counter() - start, 1)
    table = report.write(results, args.output_dir)
    print(table)
    print(f"\nJSON, markdown and plot in {args.output_dir}/ ({results['settings']['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
