"""The Adam state of a group across one step's basis changes (the rules are in ``adam.py``).

Core moments (B, R_1, ..., R_d) are padded into the augmented coordinates and rotated by the truncation. The
K-gradient moments of all factorized modes live in one buffer ``K`` (B, 4, sum_i N_i, W): the planes m, v, wm, wv,
each mode's rows one block (``layout[i] = (first row, N_i, W_i)``; the weights are equal in every row of a mode).
One Adam update and one transport serve every mode; modes of equal row counts are transported in one matmul.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .adam import AdamMoments, adam_direction, transport_planes
from .masks import column_mask, fit_columns, fit_square
from .tucker import batch_fold, batch_mode_dot, batch_unfold

Layout = list[tuple[int, int, int] | None]


def precondition(K: Tensor | None, layout: Layout, k_grads: list[Tensor | None], adam: dict | None,
                 stacked: Tensor | None = None) -> tuple[list[Tensor | None], Tensor | None]:
    """Adam directions of the K-gradients (every mode in one call on the row-stacked moments) and the updated
    buffer; the gradients themselves for SGD. ``stacked``: the K-gradients already stacked by rows (B, sum_i N_i, W)."""
    if adam is None or K is None:
        return list(k_grads), None
    if stacked is None:
        stacked = torch.cat([fit_columns(G, K.shape[-1]) for G in k_grads if G is not None], 1)
    direction, state = adam_direction(stacked, AdamMoments(*K.unbind(1)), adam["betas"], adam["eps"])
    dirs = [None if e is None else direction[:, e[0]:e[0] + e[1], :e[2]] for e in layout]
    return dirs, torch.stack(state.tensors(), 1)


def pad_core_moments(moments: AdamMoments, old: Tensor) -> AdamMoments:
    """Moments in the augmented coordinates: entries outside the old block get ``m = wm = 0`` and the mean ``v``,
    ``wv`` of the old block (``adam.py``)."""
    dims = tuple(range(2, moments.v.dim() + 1))
    mask = old.to(moments.v.dtype)[:, None]
    pair = torch.stack([moments.v, moments.wv], 1)                          # (B, 2, ...)
    means = (pair * mask).sum(dims, keepdim=True) / mask.sum(dims, keepdim=True).clamp_min(1)
    v, wv = torch.where(old[:, None], pair, means).unbind(1)
    return AdamMoments(moments.m, v, moments.wm, wv)


def rotate_core_moments(state: AdamMoments, rotations: list[Tensor | None]) -> AdamMoments:
    """``m x_i P_i^T`` and ``(v, wm, wv) x_i (P_i * P_i)^T`` (``adam.py``), all four in one product per mode."""
    X = torch.stack(state.tensors(), 1)                                      # (B, 4, ...)
    B = X.shape[0]
    for i, P in enumerate(rotations):
        if P is not None:
            P2 = P * P
            mats = torch.stack([P, P2, P2, P2], 1).flatten(0, 1)             # (4 B, R_i, R_i)
            X = batch_mode_dot(X.flatten(0, 1), mats.mT, i).unflatten(0, (B, 4))
    return AdamMoments(*X.unbind(1))


def column_maps(old_ranks: Tensor, ranks: Tensor, rotations: list[Tensor | None], matrix: bool,
                qs_old: list[Tensor | None], qs_new: list[Tensor | None], shape: list[int], width: int
                ) -> list[tuple[Tensor, Tensor, Tensor] | None]:
    """Per factorized mode: ``T`` (B, W, W) from the old to the new K-gradient columns, the old columns with
    history and the new columns kept ((B, W) bool each). ``T = Q_old^T E^T (kron_{j != i} P_j) Q_new``; a matrix
    (``Q = I``, one shared rank): ``T = E^T P_other``."""
    if matrix:
        old, new = column_mask(old_ranks[:, 0], width), column_mask(ranks[:, 0], width)
        return [(fit_square(rotations[1 - i], width) * old[:, :, None].to(rotations[i].dtype), old, new)
                for i in range(2)]
    old_blocks = [None if P is None else column_mask(old_ranks[:, i], P.shape[-2]) for i, P in enumerate(rotations)]
    out: list[tuple[Tensor, Tensor, Tensor] | None] = []
    for i, P in enumerate(rotations):
        if P is None:
            out.append(None)
            continue
        k_old = torch.minimum(old_ranks[:, i], old_ranks.prod(-1) // old_ranks[:, i].clamp_min(1))
        k_new = torch.minimum(ranks[:, i], ranks.prod(-1) // ranks[:, i].clamp_min(1))
        T = column_transport(qs_old[i], qs_new[i], rotations, old_blocks, i, shape)
        out.append((fit_square(T, width), column_mask(k_old, width), column_mask(k_new, width)))
    return out


def transport_factor_moments(K: Tensor, layout: Layout, maps: list[tuple[Tensor, Tensor, Tensor] | None]
                             ) -> Tensor:
    """The K-moment buffer in the new column coordinates (``adam.transport_planes`` per mode), zero past the new
    columns: modes of equal rows (consecutive in ``K``) as one batch, else one product per mode."""
    entries = [(e, m) for e, m in zip(layout, maps) if e is not None]
    groups = [entries] if len({e[1] for e, _ in entries}) == 1 else [[entry] for entry in entries]
    blocks = []
    for part in groups:
        (start, n, _), _ = part[0]
        X = K[:, :, start:start + n * len(part)].unflatten(2, (len(part), n))                 # (B, 4, M, n, W)
        T, active, keep = (torch.stack(t, 1) for t in zip(*(m for _, m in part)))          # (B, M, ...)
        moved = transport_planes(X, T, active) * keep[:, None, :, None, :].to(K.dtype)
        blocks.append(moved.flatten(2, 3))
    return torch.cat(blocks, 2) if len(blocks) > 1 else blocks[0]


def column_transport(q_old: Tensor, q_new: Tensor, rotations: list[Tensor | None], old: list[Tensor | None],
                     mode: int, shape: list[int]) -> Tensor:
    """``T = Q_old^T E^T (kron_{j != i} P_j) Q_new`` (B, q_old, q_new) of a Tucker mode: each column of ``Q_new``
    folded to a core slice, taken back to the augmented coordinates by the other modes' ``P_j``, restricted to the
    old block (``E^T``) and expressed in ``Q_old``'s columns."""
    folded = list(shape)
    folded[mode] = q_new.shape[-1]
    X = batch_fold(q_new.mT, mode, folded)                                  # (B, ..., q_new, ...)
    for j, P in enumerate(rotations):
        if j != mode and P is not None:
            X = batch_mode_dot(X, P, j) * old[j].reshape(-1, *[n if l == j else 1 for l, n in enumerate(folded)]
                                                         ).to(X.dtype)
    return (batch_unfold(X, mode) @ q_old).mT
