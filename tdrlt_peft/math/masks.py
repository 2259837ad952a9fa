"""Masks and index helpers of the step engine: every rank decision is a mask on the device, never a Python int.

Tensors are batches ``(B, ...)`` of fixed-width matrices whose entries past a per-matrix count are zero.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .orth import positions


def column_mask(count: Tensor, width: int) -> Tensor:
    """``(..., width)`` bool: column j < count[...]."""
    return positions(width, count.device) < count[..., None]


def block_mask(ranks: Tensor, shape: list[int]) -> Tensor:
    """``(B, *shape)`` bool: the leading ``ranks[b]`` block of every mode."""
    mask = None
    for i, n in enumerate(shape):
        m = column_mask(ranks[:, i], n).reshape(-1, *[n if j == i else 1 for j in range(len(shape))])
        mask = m if mask is None else mask & m
    return mask


def shift_matrix(offset: Tensor, width: int, dtype: torch.dtype) -> Tensor:
    """``Σ`` (B, width, width) with ``Σ[b, j, offset_b + j] = 1``: ``Ũ Σ`` moves column j to position offset + j."""
    j = positions(width, offset.device)
    return (j[None, None, :] == (j[None, :, None] + offset[:, None, None])).to(dtype)


def fit_columns(X: Tensor, width: int) -> Tensor:
    """Slice or zero-pad the last dimension to ``width``."""
    extra = width - X.shape[-1]
    return X[..., :width] if extra <= 0 else torch.nn.functional.pad(X, (0, extra))


def fit_square(X: Tensor, width: int) -> Tensor:
    """Slice or zero-pad the last two dimensions to ``width``."""
    return fit_columns(fit_columns(X, width).mT, width).mT
