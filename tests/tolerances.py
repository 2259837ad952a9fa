"""Every numerical tolerance of the test-suite, keyed by dtype (one place, not scattered through tests)."""

import torch

# identities that hold exactly in exact arithmetic, evaluated through the public API
IDENTITY = {torch.float64: 1e-10, torch.float32: 1e-4}
# autograd comparisons (custom backward vs dense reference)
GRADIENT = {torch.float64: 1e-10, torch.float32: 1e-4}
# max |U^T U - I| of a stored basis
ORTHONORMAL = {torch.float64: 1e-12, torch.float32: 1e-5}
# batched integrator step vs the per-adapter step (same operations, other summation orders)
BATCHED = {torch.float64: 1e-10, torch.float32: 1e-5}
# 2-process DDP run vs 1-process run with the same global batch: max |ΔW_2 - ΔW_1| (and head) after 12 Trainer
# steps (measured: float32 2.5e-6, float64 2e-15 on a tiny DeBERTa, ΔW entries up to ~0.1)
DATA_PARALLEL = {torch.float64: 1e-12, torch.float32: 5e-5}
# truncation error of a step vs its bound tau * ||Ĉ||_F (relative slack for round-off)
TRUNCATION_SLACK = {torch.float64: 1e-10, torch.float32: 1e-5}
# half precision: merged vs unmerged outputs, unmerge vs the original weight, reloaded vs saved adapters (each
# a handful of roundings of values of order 1 at eps = 2^-7 (bfloat16) / 2^-10 (float16))
LOW_PRECISION = {torch.bfloat16: 2 * 2.0**-7, torch.float16: 2 * 2.0**-10}
