"""``python -m benchmarks.glue`` / ``tdrlt-glue``: see ``--help``; no arguments runs the offline demo."""

import logging
import sys
import time
import warnings

from . import RunnerError


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    try:
        from .args import parse_args

        args = parse_args(argv)
        import datasets
        import transformers

        from .report import write_report
        from .run import run_all

        datasets.disable_progress_bars()  # the Trainer's progress bar is the one that matters
        transformers.logging.set_verbosity_error()  # e.g. the load report of the freshly initialised head
        transformers.logging.disable_progress_bar()  # weight loading; the Trainer's bar stays
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft on transformers 5
        run_all(args)
        table = write_report(args.run.output_dir)
    except RunnerError as err:
        print(f"tdrlt-glue: error: {err}", file=sys.stderr)
        return 2
    print(f"\n{table}\n\nResults, plots and one JSON per run in {args.run.output_dir}/ "
          f"(total {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
