"""Tucker tensor algebra in plain torch (tensorly's vocabulary, without its backend machinery).

A Tucker tensor is ``(core, factors)`` with ``core.shape == ranks`` and ``factors[i].shape == (n_i, r_i)``;
it represents ``W = core x_1 U_1 x_2 ... x_d U_d``. A factor may be ``None``: that mode is not factorized
(identity factor, ``r_i = n_i``). A matrix ``U S V^T`` is the Tucker tensor ``(S, [U, V])``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def batch_unfold(tensor: Tensor, mode: int) -> Tensor:
    """``Mat_i`` of every tensor of a batch: ``(B, n_1, ..., n_d) -> (B, n_i, prod_{j != i} n_j)``."""
    return torch.movedim(tensor, mode + 1, 1).reshape(tensor.shape[0], tensor.shape[mode + 1], -1)


def batch_fold(matrix: Tensor, mode: int, shape: Sequence[int]) -> Tensor:
    """Exact inverse of :func:`batch_unfold`; ``shape`` is one tensor's shape ``(n_1, ..., n_d)``."""
    moved = [shape[mode], *[s for j, s in enumerate(shape) if j != mode]]
    return torch.movedim(matrix.reshape(matrix.shape[0], *moved), 1, mode + 1)


def batch_mode_dot(tensor: Tensor, matrix: Tensor, mode: int) -> Tensor:
    """``T_b x_i M_b`` for every b: ``tensor`` (B, n_1, ..., n_d), ``matrix`` (B, m, n_i) -> (B, ..., m, ...)."""
    if tensor.dim() == 3:                     # a batch of matrices: M T or T M^T, one matmul and no copy
        return matrix @ tensor if mode == 0 else tensor @ matrix.mT
    shape = list(tensor.shape[1:])
    shape[mode] = matrix.shape[-2]
    return batch_fold(matrix @ batch_unfold(tensor, mode), mode, shape)


def unfold(tensor: Tensor, mode: int) -> Tensor:
    """Mode-``mode`` unfolding ``Mat_i(T)``: mode ``i`` to rows, the other modes (in order) to columns."""
    return batch_unfold(tensor[None], mode)[0]                             # (n_i, prod_{j != i} n_j)


def fold(matrix: Tensor, mode: int, shape: Sequence[int]) -> Tensor:
    """Exact inverse of :func:`unfold`: ``fold(unfold(T, i), i, T.shape) == T``."""
    return batch_fold(matrix[None], mode, shape)[0]


def mode_dot(tensor: Tensor, matrix: Tensor | None, mode: int) -> Tensor:
    """``T x_i M``: multiplies mode ``i`` of ``T`` by ``M`` (shape ``(m, n_i)``); ``None`` is the identity."""
    if matrix is None:
        return tensor
    # contract mode i of T with the columns of M, then put the new axis back at position i
    return torch.movedim(torch.tensordot(tensor, matrix, dims=([mode], [1])), -1, mode)


def multi_mode_dot(tensor: Tensor, matrices: Sequence[Tensor | None], skip: int | None = None,
                   transpose: bool = False) -> Tensor:
    """``T x_1 M_1 ... x_d M_d`` (``M_i^T`` with ``transpose``), leaving out mode ``skip``."""
    for i, m in enumerate(matrices):
        if i == skip or m is None:
            continue
        tensor = mode_dot(tensor, m.T if transpose else m, i)
    return tensor


def tucker_to_tensor(core: Tensor, factors: Sequence[Tensor | None]) -> Tensor:
    """Full tensor ``core x_1 U_1 ... x_d U_d``."""
    return multi_mode_dot(core, factors)


def project_to_core(tensor: Tensor, factors: Sequence[Tensor | None]) -> Tensor:
    """``T x_1 U_1^T ... x_d U_d^T``: the core of the orthogonal projection onto the factors' spans."""
    return multi_mode_dot(tensor, factors, transpose=True)


def hosvd(tensor: Tensor, ranks: Sequence[int | None]) -> tuple[Tensor, list[Tensor | None]]:
    """Truncated higher-order SVD: ``factors[i]`` = leading ``ranks[i]`` left singular vectors of ``Mat_i(T)``.

    ``ranks[i] = None`` leaves mode ``i`` unfactorized. Error ``||T - T_hat||_F <= sqrt(sum_i e_i^2)`` with
    ``e_i`` the discarded singular values of mode ``i``.
    """
    factors: list[Tensor | None] = []
    for i, r in enumerate(ranks):
        if r is None:
            factors.append(None)
            continue
        left, _, _ = torch.linalg.svd(unfold(tensor, i), full_matrices=False)
        factors.append(left[:, :r])
    return project_to_core(tensor, factors), factors
