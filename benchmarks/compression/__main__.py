"""``python -m benchmarks.compression``: the full table (about 30 min on 2 cores); ``--smoke``: a quick check."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import BenchmarkError
from .methods import LowRankSettings, build
from .models import NETWORKS
from .report import write_report
from .run import make_specs, run_all

METHODS = ("dense", "tdlrt", "tucker-gd", "matrix")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compression", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="tucker-gd trains the final ranks of the TDLRT run with the same tau and seed")
    p.add_argument("--taus", nargs="+", type=float, default=[0.2, 0.25, 0.3],
                   help="relative truncation tolerances of TDLRT and matrix DLRT")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--train-size", type=int, default=8000, help="fixed random subset of the 60k training images")
    p.add_argument("--test-size", type=int, default=10000, help="test images (10k = the whole test set)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate of every method (cosine decay)")
    p.add_argument("--core-lr-factor", type=float, default=3.0, help="TDLRT/DLRT step learning rate = lr x this")
    p.add_argument("--core-optimizer", default="adam", choices=["adam", "sgd"])
    p.add_argument("--r-init", type=int, default=32, help="initial rank per channel mode (random factors)")
    p.add_argument("--r-max", type=int, default=64, help="largest rank per channel mode")
    p.add_argument("--truncation-interval", type=int, default=1,
                   help="TDLRT / DLRT: the tau rule every P steps and at the last; the steps between keep every "
                        "augmented direction")
    p.add_argument("--rank-freeze-fractions", nargs="*", type=float, default=[],
                   help="also run each TDLRT tau with its ranks frozen after these fractions of the steps (the "
                        "ablation of ranks that keep adapting: free against frozen, same seed)")
    p.add_argument("--target-params", nargs="*", type=int, default=[],
                   help="also run TDLRT in budget mode at these numbers of factorized convolution parameters "
                        "(factorize(target_params=N); the first, dense convolution is not in the budget)")
    p.add_argument("--class-shift", type=float, default=0.0,
                   help="a data shift: the first fraction of the steps trains on classes 0-4 only, the rest on all")
    p.add_argument("--validation-size", type=int, default=0,
                   help="also score on this many training-set images outside the training subset (0: none)")
    p.add_argument("--workers", type=int, default=2, help="runs in parallel (processes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST *-idx?-ubyte.gz files")
    p.add_argument("--output-dir", type=Path, default=Path("outputs/compression"))
    p.add_argument("--smoke", action="store_true", help="tiny run (1 seed, 1 epoch, 512 images, tau 0.3)")
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds, args.epochs, args.train_size, args.test_size, args.taus = 1, 1, 512, 1000, [0.3]
        if args.output_dir == Path("outputs/compression"):
            args.output_dir = Path("outputs/compression-smoke")
    if "tucker-gd" in args.methods and "tdlrt" not in args.methods:
        p.error("tucker-gd takes its ranks from the TDLRT runs: add tdlrt to --methods")
    if args.train_size + args.validation_size > 60000:
        p.error(f"--train-size + --validation-size must be at most the 60000 training images, got "
                f"{args.train_size + args.validation_size}")
    if not 0.0 <= args.class_shift < 1.0:
        p.error(f"--class-shift is a fraction of the steps in [0, 1), got {args.class_shift}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = LowRankSettings(r_init=args.r_init, r_max=args.r_max, lr=args.lr,
                               core_lr_factor=args.core_lr_factor, core_optimizer=args.core_optimizer,
                               truncation_interval=args.truncation_interval)
    specs = make_specs(args.networks, args.methods, args.taus, list(range(args.seeds)), args.epochs,
                       args.batch_size, settings, args.rank_freeze_fractions, args.class_shift, args.target_params)
    for spec in specs:                 # an unreachable budget fails here, in seconds, with the feasible range
        if spec.method.budget is not None and spec.seed == 0:
            try:
                build(spec.method, spec.network, 0, settings)
            except ValueError as err:
                print(f"benchmarks.compression: error: --target-params for {spec.network}: {err}", file=sys.stderr)
                return 2
    start = time.perf_counter()
    try:
        results = run_all(specs, args.output_dir, data_dir=args.data_dir, train_size=args.train_size,
                          test_size=args.test_size, workers=args.workers, threads=args.threads,
                          validation_size=args.validation_size)
    except BenchmarkError as err:
        print(f"benchmarks.compression: error: {err}", file=sys.stderr)
        return 2
    total = time.perf_counter() - start
    extras = [f", truncation interval {args.truncation_interval}"] if args.truncation_interval > 1 else []
    if args.class_shift:
        extras.append(f", classes 0-4 only for the first {100 * args.class_shift:g} % of the steps")
    if args.validation_size:
        extras.append(f", {args.validation_size} validation images (training images outside the subset)")
    header = (f"Fashion-MNIST, {args.train_size} training images, {args.epochs} epochs, batch {args.batch_size}, "
              f"{args.test_size} test images, {args.seeds} seed(s); Adam lr {args.lr:g} (cosine), TDLRT/DLRT core "
              f"{args.core_optimizer} x{args.core_lr_factor:g}, r_init {args.r_init}, r_max {args.r_max}"
              f"{''.join(extras)}; "
              f"{args.workers} worker(s) x {args.threads} thread(s); total {total / 60:.1f} min (the runs' own "
              f"training: {sum(r['wall_time_s'] for r in results) / 60:.1f} min, stored runs reused). Compression: "
              "1 - (stored convolution weights) / (dense convolution weights), the first conv stays dense.")
    table = write_report(results, args.output_dir, header)
    print(f"\n{table}\n\nRun JSONs, results.md and accuracy_vs_compression.png in {args.output_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
