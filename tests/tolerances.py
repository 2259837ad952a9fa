"""Every numerical tolerance of the test-suite, keyed by dtype (one place, not scattered through tests)."""

import torch

# identities that hold exactly in exact arithmetic, evaluated through the public API
IDENTITY = {torch.float64: 1e-10, torch.float32: 1e-4}
# autograd comparisons (custom backward vs dense reference)
GRADIENT = {torch.float64: 1e-10, torch.float32: 1e-4}
# max |U^T U - I| of a stored basis
ORTHONORMAL = {torch.float64: 1e-12, torch.float32: 1e-5}
