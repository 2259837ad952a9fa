"""Thread settings for the step's small linear algebra on the CPU."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def single_threaded_linalg(device: torch.device):
    """The step's QR/SVDs are tiny (r x r to n x 2r): on CPU, multi-threaded LAPACK spends far longer
    synchronising threads than computing (measured with MKL on 2 cores: QR of 64x4 8 ms with 2 threads,
    7 us with 1; SVD 54 ms vs 20 us). The same holds for the step's other small ops (zeroing a 768 x 16 slice:
    0.4 ms on one thread, up to 100 ms on two threads of a loaded machine). Run them on one thread and restore the
    setting afterwards."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
