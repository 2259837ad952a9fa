"""``python -m benchmarks.dreambooth`` / ``tdrlt-dreambooth``: see ``--help``; no arguments: the offline benchmark."""

from __future__ import annotations

import logging
import sys
import time
import warnings

from . import RunnerError


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    start, cpu = time.perf_counter(), time.process_time()
    try:
        from .args import parse_args

        args = parse_args(argv)
        import torch
        import transformers
        from diffusers.utils import logging as diffusers_logging

        import tdrlt_peft  # noqa: F401  (registers the PEFT method)

        from .report import write_report
        from .run import run_all

        torch.set_num_threads(args.threads)
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft on transformers 5
        run_all(args)
        table = write_report(args.output_dir)
    except RunnerError as err:
        print(f"tdrlt-dreambooth: error: {err}", file=sys.stderr)
        return 2
    print(f"\n{table}\nResults, plots, samples and one JSON per run in {args.output_dir}/ "
          f"(total {time.perf_counter() - start:.0f} s wall, {time.process_time() - cpu:.0f} s CPU in this process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
