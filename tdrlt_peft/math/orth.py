"""Orthonormal bases from batched matmuls and one small eigendecomposition: what a GPU does well.

Every function works on a batch ``(B, n, R)`` of fixed-width matrices whose columns past a per-matrix count are
zero (``docs/algorithm.md``, "Storage and rank"), takes masks instead of Python ints, and reads nothing on the host.

* :func:`complement_basis` — an orthonormal basis of ``range((I - U U^T) D)``: Gram matrix ``Z^T Z`` and one batched
  ``eigh`` (SVQB), then Newton-Schulz iterations (matmuls only) that bring the columns to orthonormality.
* :func:`polar_step` — one Newton-Schulz step ``U <- U (3I - U^T U) / 2`` that undoes the round-off drift of a basis,
  with the matrix ``(I + U^T U) / 2`` the core absorbs so that ``W`` changes by ``O(||U^T U - I||^2)`` only.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Directions of a projected gradient with singular value below GRAM_DROP * sqrt(eps) * ||D||_F are dropped: a Gram
# matrix resolves singular values only down to ~sqrt(eps) of the largest, and this bound keeps the first pass's
# orthogonality error below ~1 / GRAM_DROP^2, which two Newton-Schulz iterations take to round-off.
GRAM_DROP = 10.0
NEWTON_SCHULZ_ITERATIONS = 2


_CONSTANTS: dict[tuple, Tensor] = {}


def identity(n: int, like: Tensor) -> Tensor:
    """The ``n x n`` identity in ``like``'s dtype and device, made once (no kernel per step)."""
    key = ("eye", n, like.dtype, like.device)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.eye(n, dtype=like.dtype, device=like.device)
    return _CONSTANTS[key]


def constant(value: float, like: Tensor) -> Tensor:
    """A 0-dim tensor ``value`` in ``like``'s dtype and device, made once (an operand for fused scalar kernels)."""
    key = ("constant", value, like.dtype, like.device)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.full((), value, dtype=like.dtype, device=like.device)
    return _CONSTANTS[key]


def positions(n: int, device: torch.device) -> Tensor:
    """``arange(n)`` on ``device``, made once."""
    key = ("arange", n, device)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.arange(n, device=device)
    return _CONSTANTS[key]


def stack_square(mats: list[Tensor]) -> tuple[Tensor, list[int]]:
    """Stack symmetric batches ``(B_k, m_k, m_k)`` into one ``(sum B_k, M, M)``, ``M = max m_k``, padding each with
    ``-1`` on the diagonal: the padded eigenvalues are negative (never kept) and their eigenvectors stay in the pad."""
    size = max(m.shape[-1] for m in mats)
    padded = []
    for m in mats:
        extra = size - m.shape[-1]
        if extra:
            m = torch.nn.functional.pad(m, (0, extra, 0, extra))
            m = m - torch.diag_embed(torch.cat([m.new_zeros(size - extra), m.new_ones(extra)]))
        padded.append(m)
    return (torch.cat(padded) if len(padded) > 1 else padded[0]), [m.shape[0] for m in mats]


def eigh_descending(mats: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """One batched ``eigh`` of all ``mats`` (symmetric, ``(B_k, m_k, m_k)``): per batch the eigenvalues ``(B_k, m_k)``
    in descending order and the eigenvectors ``(B_k, m_k, m_k)`` in the same column order."""
    stacked, counts = stack_square(mats)
    # a step with non-finite gradients is computed too (and then not written): keep LAPACK's input finite
    values, vectors = torch.linalg.eigh(torch.nan_to_num(stacked, 0.0, 0.0, 0.0))   # ascending
    values, vectors = values.flip(-1), vectors.flip(-1)
    out, start = [], 0
    for m, count in zip(mats, counts):
        size = m.shape[-1]
        out.append((values[start:start + count, :size], vectors[start:start + count, :size, :size]))
        start += count
    return out


def newton_schulz(Y: Tensor, iterations: int = NEWTON_SCHULZ_ITERATIONS) -> Tensor:
    """``Y <- Y (3I - Y^T Y) / 2 = 1.5 Y - 0.5 Y (Y^T Y)`` repeated: the polar factor of a nearly orthonormal ``Y``
    (zero columns stay zero)."""
    for _ in range(iterations):
        Y = torch.baddbmm(Y, Y, Y.mT @ Y, beta=1.5, alpha=-0.5)
    return Y


def project_out(U: Tensor, Z: Tensor) -> Tensor:
    """``(I - U U^T) Z``, twice for float32 stability."""
    Z = torch.baddbmm(Z, U, U.mT @ Z, alpha=-1.0)
    return torch.baddbmm(Z, U, U.mT @ Z, alpha=-1.0)


def complement_gram(U: Tensor, D: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """First half of :func:`complement_basis`: ``Z = (I - U U^T) D``, its Gram matrix ``Z^T Z`` and the square of the
    drop threshold ``(GRAM_DROP sqrt(eps) ||D||_F)^2`` (B,); split so that many eigendecompositions run in one call."""
    Z = torch.baddbmm(D, U, U.mT @ D, alpha=-1.0)    # once: the basis made from Z is projected twice again
    threshold = (GRAM_DROP * eps ** 0.5) ** 2 * (D * D).sum((-2, -1))      # (B,)
    return Z, Z.mT @ Z, threshold


def complement_basis(U: Tensor, Z: Tensor, values: Tensor, vectors: Tensor, threshold: Tensor, max_new: Tensor
                     ) -> tuple[Tensor, Tensor]:
    """Orthonormal ``Ũ`` ``(B, n, R)`` of ``range(Z)``, ``Z = (I - U U^T) D``, from the eigenpairs of ``Z^T Z``
    (descending): ``Ũ = Z E Λ^{-1/2}`` on the leading ``k = min(#{λ > threshold}, max_new)`` columns, zero after them,
    then orthogonal to ``U`` again and polished by Newton-Schulz. Returns ``Ũ`` and ``k`` ``(B,)``."""
    found = (values > threshold[:, None]).sum(-1)                          # (B,)
    count = torch.minimum(found, max_new)
    keep = positions(values.shape[-1], values.device)[None, :] < count[:, None]                  # (B, R)
    scale = values.clamp_min(torch.finfo(values.dtype).tiny).rsqrt() * keep
    new = Z @ (vectors * scale[:, None, :])
    return newton_schulz(project_out(U, new)), count


def polar_step(U: Tensor) -> tuple[Tensor, Tensor]:
    """One Newton-Schulz step on a basis and the matrix its core absorbs: ``U' = U (3I - A) / 2``, ``M = (I + A) / 2``
    with ``A = U^T U``, so ``U' M = U (I - (A - I)^2 / 4)``: ``W`` is unchanged to second order in the drift."""
    A = U.mT @ U
    return torch.baddbmm(U, U, A, beta=1.5, alpha=-0.5), torch.lerp(A, identity(A.shape[-1], A), 0.5)
