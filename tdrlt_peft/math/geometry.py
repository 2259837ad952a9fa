"""Small pure geometry functions of the rank-adaptive step: basis augmentation, rank selection, orthonormality.

All functions take and return plain tensors, never modify their inputs and import nothing from PEFT.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Singular values below this many eps(dtype) * sigma_1 count as zero in the rank decision (tau = 0 keeps
# the exact rank, not round-off).
ZERO_SV_FACTOR = 100.0
# Re-orthonormalise a basis when max|U^T U - I| exceeds this many sqrt(r) * eps(dtype).
ORTHO_FACTOR = 10.0


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Linear algebra runs in float64 for float64 parameters and in float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def random_orthonormal(n: int, r: int, dtype: torch.dtype, device=None, generator=None) -> Tensor:
    """An ``(n, r)`` matrix with orthonormal columns (QR of a Gaussian matrix, computed in ``dtype``)."""
    gaussian = torch.randn(n, r, dtype=dtype, device=device, generator=generator)
    q, _ = torch.linalg.qr(gaussian)
    return q


def orthogonality_error(U: Tensor) -> float:
    """``max |U^T U - I|``; 0 for a basis with no columns."""
    if U.shape[1] == 0:
        return 0.0
    eye = torch.eye(U.shape[1], dtype=U.dtype, device=U.device)
    return (U.T @ U - eye).abs().max().item()


def in_manifold(U: Tensor, atol: float | None = None) -> bool:
    """Whether ``U`` has orthonormal columns (to ``atol``, default ORTHO_FACTOR * sqrt(r) * eps)."""
    atol = orthonormality_tolerance(U) if atol is None else atol
    return orthogonality_error(U) <= atol


def orthonormality_tolerance(U: Tensor) -> float:
    return ORTHO_FACTOR * math.sqrt(max(U.shape[1], 1)) * eps(U.dtype)


def augment_basis(U: Tensor, G: Tensor, max_new: int) -> Tensor:
    """Orthonormal basis ``Ũ`` of ``range((I - U U^T) G)`` with at most ``max_new`` columns (one matrix; the step
    engine does the same for a batch, ``orth.complement_basis``).

    ``U``: ``(n, r)`` orthonormal; ``G``: ``(n, m)``. Returns ``Ũ`` ``(n, k)`` with ``Ũ^T U = 0`` and ``Ũ^T Ũ = I``.
    Directions the gradient does not have (singular values of the projected gradient below
    ``orth.GRAM_DROP * sqrt(eps) * ||G||_F``) are dropped, so a rank-deficient ``G`` gives fewer columns.
    """
    from .orth import complement_basis, complement_gram, eigh_descending

    n = U.shape[0]
    max_new = min(max_new, n - U.shape[1])
    if max_new <= 0 or G.shape[1] == 0:
        return U.new_zeros(n, 0)
    Z, gram, threshold = complement_gram(U[None], G[None], eps(G.dtype))
    values, vectors = eigh_descending([gram])[0]
    new, count = complement_basis(U[None], Z, values, vectors, threshold, torch.tensor([max_new], device=G.device))
    return new[0, :, : int(count[0])]


def truncation_ranks(values: Tensor, tau: Tensor, r_min: Tensor, cap: Tensor, absolute: Tensor,
                     current: Tensor | None = None) -> Tensor:
    """Smallest ``k`` with ``sum_{j >= k} σ_j^2 <= (τ ||σ||)^2`` (``<= τ^2`` if absolute), from ``values = σ^2``
    ``(B, m)`` (descending, up to round-off), one rank per row and no host read. ``σ_j <= ZERO_SV_FACTOR eps σ_1``
    counts as zero, so τ = 0 keeps the exact rank, not round-off.
    Clamped to ``[r_min, cap]`` (``cap >= 1``). An all-zero row (a zero core after a step of learning rate 0, as
    the first step of a linear warm-up) gives ``current`` (B,), the rank before the step: a step that changes
    nothing keeps the rank. Without ``current`` (no rank before: a dense weight) it gives ``r_min``."""
    cutoff = (ZERO_SV_FACTOR * eps(values.dtype)) ** 2 * values.amax(-1, keepdim=True)
    values = values * (values > cutoff)                                     # also clears negative round-off
    tail = values.flip(-1).cumsum(-1).flip(-1)                              # tail[j] = sum_{l >= j} σ_l^2
    tau2 = tau * tau
    threshold = torch.where(absolute, tau2, tau2 * tail[:, 0])
    k = (tail > threshold[:, None]).sum(-1)
    if current is not None:
        k = torch.where(tail[:, 0] > 0, k, current)
    return torch.clamp(k, r_min, cap)                                       # cap >= 1: ranks are >= 1


def truncation_rank(sigma: Tensor, tau: float, r_min: int, r_max: int, absolute: bool = False) -> int:
    """:func:`truncation_ranks` of one descending vector of singular values ``sigma`` (a host read), with the cap
    ``min(r_max, len(sigma))``."""
    values = (sigma.to(compute_dtype(sigma.dtype)) ** 2)[None]
    device = sigma.device
    cap = max(1, min(r_max, sigma.numel()))
    k = truncation_ranks(values, torch.tensor([tau], dtype=values.dtype, device=device),
                         torch.tensor([r_min], device=device), torch.tensor([cap], device=device),
                         torch.tensor([absolute], device=device))
    return int(k[0])


def truncates(step: int, interval: int, total_steps: int | None = None) -> bool:
    """Whether optimizer step ``step`` (0-based) applies the tolerance rule, with ``truncation_interval`` P: steps
    0, P, 2P, ... and the last step (``total_steps - 1``, so a run ends truncated). P = 1 truncates every step (the
    default). The steps in between keep every augmented direction (up to ``r_max``).

    Why (measured on MiniLM, ``benchmarks/glue/RANKS.md``): the parallel step's augmented core
    ``Ŝ = [[S - λG_S, B], [A, 0]]`` has a zero new-new block, so its singular values past the current rank are the
    Schur complement ``~ ||A S^{-1} B|| = O(λ^2 g^2 / σ_r)``: second order, and ever smaller against ``τ ||Ŝ||``
    as the core grows. A direction kept for a step enters the basis, and the next gradient moves its new-new entries
    at first order (``λ Ũ^T G Ṽ`` becomes part of ``G_S``), so after P - 1 kept steps a direction the gradient keeps
    asking for has a singular value of order ``(P - 1) λ g`` when the tolerance judges it."""
    if interval < 1:
        raise ValueError(f"truncation_interval must be an integer >= 1, got {interval}.")
    return step % interval == 0 or (total_steps is not None and step >= total_steps - 1)


def frozen(step: int, freeze_step: int | None, interval: int = 1) -> bool:
    """Whether ranks are frozen at optimizer step ``step`` (0-based; None: never): after the last truncation step
    at or before ``freeze_step`` (its tau decision is the last one, so ranks never freeze at the untruncated ranks
    of a step in between, and no rank moves after ``freeze_step``). Frozen ranks keep their value; the bases and
    the core still rotate within them (the truncation keeps the leading ``r`` singular directions of the
    augmented core)."""
    if freeze_step is None:
        return False
    return step > freeze_step // interval * interval


def freeze_step(fraction: float | None, total_steps: int) -> int | None:
    """The freeze step of ``rank_freeze_fraction`` f for a run of ``total_steps``: ``ceil(f total_steps)``; no rank
    moves after it (:func:`frozen`)."""
    return None if fraction is None else math.ceil(fraction * total_steps)


def orthonormalize(U: Tensor) -> tuple[Tensor, Tensor]:
    """Reduced QR ``U = Q R`` with ``diag(R) >= 0``; callers keep ``W`` fixed by multiplying the core by ``R``.

    LAPACK's Householder QR often returns ``R_jj = -1`` for a nearly orthonormal ``U``, which would flip the sign
    of core slices while the Adam moments stored beside the core keep theirs. With the signs moved into ``Q``
    (``Q diag(s) diag(s) R = Q R``), ``R = I + O(eps)`` and the coordinates of the core do not change.
    """
    Q, R = torch.linalg.qr(U)
    signs = torch.where(torch.diagonal(R) < 0, -1.0, 1.0).to(R.dtype)
    return Q * signs, R * signs[:, None]
