"""``python -m benchmarks.claims [--quick] [--output-dir DIR] [--workers N] [--only NAME ...]``.

Runs every experiment (default settings: ~10 minutes on 2 CPU cores; ``--quick``: about a minute), then writes
``summary.md`` (claims, verdicts, tables), the figures and ``results.json`` to the output directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

from .runner import EXPERIMENTS, Settings, cost, experiment_module, init_worker, run_task


def run_all(tasks: list[dict], workers: int) -> Iterator[dict]:
    """The results as they complete: in worker processes (``spawn``: no forked thread pools) or, with 0 workers,
    one after the other in this process."""
    if workers == 0:
        yield from map(run_task, tasks)
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=init_worker) as pool:
        for future in as_completed([pool.submit(run_task, t) for t in tasks]):
            yield future.result()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.claims", description=__doc__.split("\n\n")[1])
    parser.add_argument("--quick", action="store_true", help="small sweeps and few steps (about a minute)")
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2; 0: run in this process)")
    parser.add_argument("--only", nargs="+", choices=EXPERIMENTS, default=list(EXPERIMENTS),
                        help="run only these experiments")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite summary.md and the figures from the output directory's results.json, run nothing")
    args = parser.parse_args(argv)
    if args.report_only:
        return rewrite_report(args.output_dir)
    settings = Settings.quick_settings(args.workers) if args.quick else Settings(workers=args.workers)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    tasks = [t for name in args.only for t in experiment_module(name).tasks(settings)]
    tasks.sort(key=cost, reverse=True)
    start = time.perf_counter()
    results: dict[str, list[dict]] = {name: [] for name in args.only}
    print(f"benchmarks.claims: {len(tasks)} runs on {args.workers} workers -> {args.output_dir}", flush=True)
    for done, result in enumerate(run_all(tasks, args.workers), 1):
        results[result["experiment"]].append(result)
        if done % max(1, len(tasks) // 20) == 0 or done == len(tasks):
            print(f"  {done}/{len(tasks)} runs, {time.perf_counter() - start:.0f} s", flush=True)
    seconds = time.perf_counter() - start
    from .report import write_summary

    command = "python -m benchmarks.claims" + (" --quick" if args.quick else "")
    (args.output_dir / "results.json").write_text(json.dumps({"settings": asdict(settings), "seconds": seconds,
                                                              "command": command, "results": results},
                                                             separators=(",", ":"), default=str))
    summary = write_summary(results, settings, args.output_dir, seconds, command)
    claims = summary.split("## Claims and verdicts")[1].split("\n## ")[0]
    print(f"\nClaims and verdicts:{claims}\nSummary, figures and results.json in {args.output_dir}/ "
          f"({seconds:.0f} s)")
    return 0


def rewrite_report(out_dir: Path) -> int:
    from .report import write_summary

    saved = json.loads((out_dir / "results.json").read_text())
    settings = Settings(**saved["settings"])
    write_summary(saved["results"], settings, out_dir, saved["seconds"], saved.get("command", "python -m "
                  "benchmarks.claims" + (" --quick" if settings.quick else "")))
    print(f"Summary and figures rewritten in {out_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
