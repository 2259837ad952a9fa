"""Small builders shared by tests: dense references and tiny models (no downloads)."""

from __future__ import annotations

import torch
from torch import nn

from tdrlt_peft.integrator import iter_storages


def dense_weight(storage) -> torch.Tensor:
    """W = C x_1 U_1 ... of one adapter's active slices (unscaled)."""
    from tdrlt_peft.tucker import tucker_to_tensor

    core, factors = storage.active()
    return tucker_to_tensor(core, factors)


def only_storage(model: nn.Module):
    storages = list(iter_storages(model))
    assert len(storages) == 1
    return storages[0]


def tangent_projection(U: torch.Tensor, V: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """P_T(G) = UU^T G + G VV^T - UU^T G VV^T (matrix manifold of fixed rank)."""
    PU, PV = U @ U.T, V @ V.T
    return PU @ G + G @ PV - PU @ G @ PV
