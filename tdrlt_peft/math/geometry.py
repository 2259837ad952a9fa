"""Small pure geometry functions of the rank-adaptive step: basis augmentation, rank selection, orthonormality.

All functions take and return plain tensors, never modify their inputs and import nothing from PEFT.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Directions of a projected gradient smaller than this many eps(dtype) * ||G|| are round-off, not gradient.
DROP_FACTOR = 100.0
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
    """Orthonormal basis ``Ũ`` of ``range((I - U U^T) G)`` with at most ``max_new`` columns.

    ``U``: ``(n, r)`` orthonormal; ``G``: ``(n, m)``. Returns ``Ũ`` ``(n, k)`` with ``Ũ^T U = 0`` and
    ``Ũ^T Ũ = I``. Directions the gradient does not have (singular values of the projected gradient below
    DROP_FACTOR * eps * ||G||_F) are dropped: a QR of a rank-deficient matrix would return columns that are
    not orthogonal to ``U``, so the basis comes from the SVD's left singular vectors instead.
    """
    n = U.shape[0]
    max_new = min(max_new, n - U.shape[1])
    if max_new <= 0:
        return U.new_zeros(n, 0)
    # Z = (I - UU^T) G, projected twice for float32 stability
    Z = G - U @ (U.T @ G)
    Z = Z - U @ (U.T @ Z)
    left, sigma, _ = torch.linalg.svd(Z, full_matrices=False)
    threshold = DROP_FACTOR * eps(G.dtype) * torch.linalg.norm(G)
    k = min(int((sigma > threshold).sum()), max_new)
    new = left[:, :k]
    # one more projection + QR removes the round-off component along range(U)
    new = new - U @ (U.T @ new)
    new, _ = torch.linalg.qr(new)
    return new


def truncation_rank(sigma: Tensor, tau: float, r_min: int, r_max: int, absolute: bool = False) -> int:
    """Smallest ``k`` with ``sqrt(sum_{j>k} sigma_j^2) <= tau * ||sigma||_2`` (``<= tau`` if ``absolute``).

    ``sigma``: singular values in descending order. Values ``<= ZERO_SV_FACTOR * eps * sigma_1`` count as
    zero. The result is clamped to ``[r_min, min(r_max, len(sigma))]``; an all-zero ``sigma`` gives
    ``r_min`` (clamped the same way).
    """
    upper = min(r_max, sigma.numel())
    values = sigma.tolist()
    if not values or values[0] <= 0.0:
        return max(1, min(r_min, upper))
    cutoff = ZERO_SV_FACTOR * eps(sigma.dtype) * values[0]
    squares = [v * v if v > cutoff else 0.0 for v in values]
    total = sum(squares)
    threshold = tau if absolute else tau * math.sqrt(total)
    # tail[k] = sqrt(sum_{j >= k} sigma_j^2), scanning from the end
    tail = 0.0
    k = len(squares)
    while k > 0 and math.sqrt(tail + squares[k - 1]) <= threshold:
        tail += squares[k - 1]
        k -= 1
    return max(min(max(k, r_min), upper), 1)


def orthonormalize(U: Tensor) -> tuple[Tensor, Tensor]:
    """Reduced QR ``U = Q R`` with ``diag(R) >= 0``; callers keep ``W`` fixed by multiplying the core by ``R``.

    LAPACK's Householder QR often returns ``R_jj = -1`` for a nearly orthonormal ``U``, which would flip the sign
    of core slices while the Adam moments stored beside the core keep theirs. With the signs moved into ``Q``
    (``Q diag(s) diag(s) R = Q R``), ``R = I + O(eps)`` and the coordinates of the core do not change.
    """
    Q, R = torch.linalg.qr(U)
    signs = torch.where(torch.diagonal(R) < 0, -1.0, 1.0).to(R.dtype)
    return Q * signs, R * signs[:, None]
