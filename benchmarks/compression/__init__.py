"""Compression benchmark: CNNs trained from scratch on Fashion-MNIST in low-rank (factorized) form.

Dense training vs TDLRT (rank-adaptive Tucker convolutions, several tau) vs fixed-rank Tucker factors trained
by plain gradient descent (the TDLRT run's final ranks) vs rank-adaptive matrix (reshaped-kernel) DLRT.
Run ``python -m benchmarks.compression --help``; ``--smoke`` is a one-minute check.
"""


class BenchmarkError(RuntimeError):
    """A user-facing error (missing data, bad argument): printed without a traceback."""
