"""The parallel rank-adaptive TDLRT step for one Tucker tensor (a matrix ``U S V^T`` is the case d = 2).

Pure torch on the *active* slices; the integrator (``integrator.py``) reads them from the layers' fixed-size
storage and writes the result back. Notation as in ``docs/algorithm.md``:

    W = C x_1 U_1 ... x_d U_d,   G = dL/dW,
    G_C  = G x_1 U_1^T ... x_d U_d^T                     (core gradient, shape of C)
    G_Ki = Mat_i(G x_{j != i} U_j^T) Q_i,  Mat_i(C)^T = Q_i R_i   (K-gradient of mode i, shape of U_i)

For a matrix ``Q = I``, so ``G_K = G V``, ``G_L = G^T U`` and ``G_S = U^T G V``.

One step with learning rate lr:
  1. augment  Û_i = [U_i, Ũ_i],  Ũ_i = orth((I - U_i U_i^T) G_Ki)
  2. Ĉ = pad(C) - lr * Ĝ  with  Ĝ[:r_1, ..., :r_d] = G_C  and, for each adaptive mode i, the block whose mode-i
     index is new (others leading) = Ten_i(Ũ_i^T G_Ki Q_i^T)   (Adam: a preconditioned Ĝ instead, see adam.py)
  3. truncate: per adaptive mode SVD Mat_i(Ĉ) = P_i Σ_i ..., keep k_i columns by the tau rule;
     C <- Ĉ x_i P_i[:, :k_i]^T,  U_i <- Û_i P_i[:, :k_i].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .adam import AdamMoments, adam_direction, pad_moments, rotate_moments, transport_columns
from .geometry import augment_basis, orthogonality_error, orthonormality_tolerance, orthonormalize, truncation_rank
from .tucker import fold, mode_dot, unfold


@dataclass
class RankBounds:
    """Rank rule of one adapter: relative (or absolute) tolerance ``tau`` and ``r_min <= r <= r_max``."""

    tau: float
    r_min: int
    r_max: int
    absolute: bool = False


@dataclass
class Proposal:
    """Result of steps 1-2 and the SVDs of step 3, before the ranks are agreed on (DDP)."""

    bases: list[Tensor | None]          # Û_i (n_i, r̂_i); None = mode not factorized
    core: Tensor                        # Ĉ (r̂_1, ..., r̂_d)
    svds: list[tuple[Tensor, Tensor] | None]   # (P_i, sigma_i) per adaptive mode
    ranks: list[int]                    # proposed new rank per mode (non-factorized: its size)
    moments: AdamMoments | None         # Adam moments in the augmented coordinates (+ K-gradient moments)
    qs: list[Tensor | None] | None = None   # Q_i of the old core (K-gradient column coordinates)
    old_ranks: list[int] | None = None      # r_i before the step


def unfolding_bases(core: Tensor, factored: Sequence[bool], matrix: bool) -> list[Tensor | None]:
    """``Q_i`` of the reduced QR ``Mat_i(C)^T = Q_i R_i`` for each factorized mode (``None`` elsewhere).

    Matrix adapters use ``Q = I`` (returned as ``None`` too). ``Q_i`` has ``min(r_i, prod_{j != i} r_j)``
    columns; when ``Mat_i(C)`` is rank-deficient the QR still returns an orthonormal ``Q_i``.
    """
    if matrix:
        return [None] * core.dim()
    return [torch.linalg.qr(unfold(core, i).T)[0] if f else None for i, f in enumerate(factored)]


def augmented_gradient(core_grad: Tensor, k_grads: Sequence[Tensor | None], new_bases: Sequence[Tensor | None],
                       qs: Sequence[Tensor | None]) -> Tensor:
    """Ĝ of step 2: ``G_C`` in the leading block, ``Ten_i(Ũ_i^T G_Ki Q_i^T)`` in mode i's new block."""
    ranks = list(core_grad.shape)
    news = [0 if b is None else b.shape[1] for b in new_bases]
    grad = core_grad.new_zeros([r + k for r, k in zip(ranks, news)])
    grad[tuple(slice(0, r) for r in ranks)] = core_grad
    for i, (G_K, new) in enumerate(zip(k_grads, new_bases)):
        if new is None or new.shape[1] == 0:
            continue
        coeff = new.T @ G_K                                    # (k_i, m_i)
        if qs[i] is not None:
            coeff = coeff @ qs[i].T                            # (k_i, prod_{j != i} r_j)
        shape = list(ranks)
        shape[i] = new.shape[1]
        index = [slice(0, r) for r in ranks]
        index[i] = slice(ranks[i], ranks[i] + new.shape[1])
        grad[tuple(index)] = fold(coeff, i, shape)
    return grad


def propose(core: Tensor, factors: Sequence[Tensor | None], core_grad: Tensor,
            k_grads: Sequence[Tensor | None], lr: float, bounds: RankBounds, *, matrix: bool,
            storage_ranks: Sequence[int], moments: AdamMoments | None = None,
            adam: dict | None = None) -> Proposal:
    """Steps 1-2 and the per-mode SVDs of step 3 on active slices.

    ``core`` (r_1..r_d), ``factors[i]`` (n_i, r_i) or None, ``core_grad`` like ``core``, ``k_grads[i]``
    (n_i, m_i) or None; ``storage_ranks[i]`` caps r̂_i (the stored width of factor i). ``moments`` and
    ``adam`` (betas, eps, weight_decay) select the Adam core update; without them the step is exact SGD.
    """
    factored = [f is not None for f in factors]
    qs = unfolding_bases(core, factored, matrix)
    # G_Ki has as many columns as Q_i: fewer than r_i when prod_{j != i} r_j < r_i (stored zero-padded to r_i)
    k_grads = [G if G is None or Q is None else G[:, : Q.shape[1]] for G, Q in zip(k_grads, qs)]
    # Adam on the K-gradients in ambient coordinates (adam.py): the directions that augment and fill Ĉ
    k_dirs, factor_moments = precondition_k_grads(k_grads, moments, adam)
    new_bases: list[Tensor | None] = []
    for i, U in enumerate(factors):
        if U is None:
            new_bases.append(None)
            continue
        r = U.shape[1]
        # at most r new columns (the tangent space's size) and never past the storage
        new_bases.append(augment_basis(U, k_dirs[i], min(r, storage_ranks[i] - r)))
    grad_hat = augmented_gradient(core_grad, k_grads, new_bases, qs)
    core_pad = pad_to(core, grad_hat.shape)
    if moments is None:
        core_hat = core_pad - lr * grad_hat
    else:
        moments = pad_moments(moments, grad_hat.shape)
        direction, moments = adam_direction(grad_hat, moments, adam["betas"], adam["eps"])
        if factor_moments is not None:
            leading = tuple(slice(0, r) for r in core.shape)
            direction = augmented_gradient(direction[leading], k_dirs, new_bases, qs)
            moments.factors = factor_moments
        core_hat = core_pad - lr * (direction + adam.get("weight_decay", 0.0) * core_pad)
    bases = [None if U is None else torch.cat([U, new], dim=1) for U, new in zip(factors, new_bases)]
    return truncation_proposal(core_hat, bases, bounds, storage_ranks, matrix, moments, qs, list(core.shape))


def precondition_k_grads(k_grads: Sequence[Tensor | None], moments: AdamMoments | None, adam: dict | None
                         ) -> tuple[list[Tensor | None], list[AdamMoments | None] | None]:
    """Adam directions of the K-gradients (entry-wise, ambient coordinates) and their updated moments; the
    gradients unchanged and None when ``moments`` keeps no K-gradient moments (SGD)."""
    if moments is None or moments.factors is None:
        return list(k_grads), None
    states = moments.factors
    dirs: list[Tensor | None] = []
    new_states: list[AdamMoments | None] = []
    for G, state in zip(k_grads, states):
        if G is None or state is None:
            dirs.append(G)
            new_states.append(None)
            continue
        state = AdamMoments(*(t[..., : G.shape[-1]] for t in state.tensors()))
        direction, state = adam_direction(G, state, adam["betas"], adam["eps"])
        dirs.append(direction)
        new_states.append(state)
    return dirs, new_states


def truncation_proposal(core_hat: Tensor, bases: list[Tensor | None], bounds: RankBounds,
                        storage_ranks: Sequence[int], matrix: bool, moments: AdamMoments | None,
                        qs: list[Tensor | None] | None = None, old_ranks: list[int] | None = None) -> Proposal:
    """The SVDs ``Mat_i(Ĉ) = P_i Σ_i ...`` and the tau-rule ranks of step 3 (shared by the BUG step)."""
    svds: list[tuple[Tensor, Tensor] | None] = []
    ranks: list[int] = []
    for i, U in enumerate(bases):
        if U is None:
            svds.append(None)
            ranks.append(core_hat.shape[i])
            continue
        P, sigma, _ = torch.linalg.svd(unfold(core_hat, i), full_matrices=False)
        svds.append((P, sigma))
        cap = min(bounds.r_max, storage_ranks[i])
        ranks.append(truncation_rank(sigma, bounds.tau, bounds.r_min, cap, bounds.absolute))
    if matrix:
        # U S V^T: the two modes share the truncated rank
        ranks = [min(ranks)] * 2
    return Proposal(bases=bases, core=core_hat, svds=svds, ranks=ranks, moments=moments, qs=qs, old_ranks=old_ranks)


def apply(proposal: Proposal, ranks: Sequence[int]) -> tuple[Tensor, list[Tensor | None], AdamMoments | None]:
    """Step 3 with the agreed ``ranks``: returns the new core, factors and (rotated) Adam moments."""
    core = proposal.core
    factors: list[Tensor | None] = []
    rotations: list[Tensor | None] = []
    for i, (U_hat, svd) in enumerate(zip(proposal.bases, proposal.svds)):
        if U_hat is None:
            factors.append(None)
            rotations.append(None)
            continue
        P, sigma = svd
        k = ranks[i]
        if sigma.numel() == 0 or sigma[0] <= 0:
            # zero core: keep the leading columns of the current basis
            P = torch.eye(U_hat.shape[1], dtype=U_hat.dtype, device=U_hat.device)
        P_k = P[:, :k]                                         # (r̂_i, k_i)
        core = mode_dot(core, P_k.T, i)
        factors.append(U_hat @ P_k)
        rotations.append(P_k)
    moments = None if proposal.moments is None else rotate_moments(proposal.moments, rotations)
    if moments is not None and proposal.moments.factors is not None:
        moments.factors = transport_factor_moments(proposal, rotations, core)
    # float32 round-off accumulates over many steps: re-orthonormalise when it shows, keeping W fixed
    for i, U in enumerate(factors):
        if U is not None and orthogonality_error(U) > orthonormality_tolerance(U):
            Q, R = orthonormalize(U)
            factors[i] = Q
            core = mode_dot(core, R, i)
    return core, factors, moments


def transport_factor_moments(proposal: Proposal, rotations: Sequence[Tensor | None], new_core: Tensor
                             ) -> list[AdamMoments | None]:
    """The K-gradient moments of ``proposal`` in the column coordinates of the new core (``adam.transport_columns``)."""
    matrix = all(q is None for q in proposal.qs)              # a matrix adapter's Q is the identity
    new_qs = unfolding_bases(new_core, [r is not None for r in rotations], matrix)
    out: list[AdamMoments | None] = []
    for i, state in enumerate(proposal.moments.factors):
        if state is None:
            out.append(None)
            continue
        T = column_transport(proposal.qs[i], new_qs[i], rotations, i, proposal.old_ranks, list(new_core.shape))
        out.append(transport_columns(state, T))
    return out


def column_transport(q_old: Tensor | None, q_new: Tensor | None, rotations: Sequence[Tensor | None], mode: int,
                     old_ranks: Sequence[int], new_shape: Sequence[int]) -> Tensor:
    """``T = Q_old^T E^T (kron_{j != i} P_j) Q_new`` (m_old, m_new): the old K-gradient columns of ``mode`` in
    the new ones. Columns are coordinates of the row space of ``Mat_i(C)`` (``Q``; None = identity, the matrix
    case), ``P_j`` (r̂_j, k_j) the truncation's rotations and ``E`` the embedding of the old ranks into the
    augmented ones. Matrix: ``T = P_other[:r_other, :k]``."""
    others = [k for j, k in enumerate(new_shape) if j != mode]
    width = math.prod(others)
    if q_new is None:
        like = next(P for P in rotations if P is not None)
        q_new = torch.eye(width, dtype=like.dtype, device=like.device)
    shape = list(new_shape)
    shape[mode] = q_new.shape[1]
    X = fold(q_new.T, mode, shape)                             # one column of Q_new per mode-i slice
    for j, P in enumerate(rotations):
        if j != mode and P is not None:
            X = mode_dot(X, P, j)                              # new coordinates k_j -> augmented r̂_j
    X = X[tuple(slice(None) if j == mode else slice(0, old_ranks[j]) for j in range(X.dim()))]
    Y = unfold(X, mode)                                        # (m_new, prod_{j != i} r_j)
    return Y.T if q_old is None else (Y @ q_old).T


def pad_to(tensor: Tensor, shape: Sequence[int]) -> Tensor:
    """Zero-pad ``tensor`` at the end of every mode to ``shape``."""
    out = tensor.new_zeros(list(shape))
    out[tuple(slice(0, s) for s in tensor.shape)] = tensor
    return out
