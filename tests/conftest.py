"""Test-suite settings: offline hub, and one intra-op thread.

On the 2-core CI machines the OpenMP/MKL thread pool costs more than it gives on the tiny tensors of the
tests (measured: a 2-layer DeBERTa forward 200 ms with 2 threads vs 10 ms with 1), so tests run on one.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
