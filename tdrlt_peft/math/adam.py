"""Adam for the core, with its state carried across basis changes.

The core lives in coordinates that change every step (augmentation, then rotation by the truncation's
singular vectors ``P_i``). The rule, per core entry:

* Moments are kept *bias-corrected*: ``m`` and ``v`` are the debiased estimates, and ``wm``, ``wv`` are the
  weights ``1 - beta^t`` that plain Adam divides by. One step:
      wm' = b1 wm + (1 - b1),   m' = (b1 wm m + (1 - b1) g) / wm'        (and the same for v with g^2, b2)
  For an entry with history (``wm = 1 - b1^t``) this is exactly Adam. A *new* direction (augmentation)
  enters with ``m = v = wm = wv = 0``, so its first step is ``m' = g``, ``v' = g^2``: Adam's own first
  step, of size ~lr, never the ``(1 - b1) / sqrt(1 - b2) ~ 3x`` blow-up of zero-padded, globally corrected
  moments.
* Augmentation: new coordinates have no first-moment history (``m = wm = 0``) but inherit the *mean*
  second moment of the existing core entries (``v``, ``wv``): the core is rotated every step, so directions
  are "new" every step, and a zero ``v`` would give each of them a full ``lr * sign(g)`` step however small its
  gradient (noise amplification, measured in ``tests/test_step_math.py``). With the inherited scale a new
  direction moves by ``lr * g / sqrt(mean v)``: in proportion to its gradient. With no history at all (the
  very first step) everything starts at zero, i.e. plain Adam's first step.
* Truncation ``C <- Ĉ x_i P_i^T``: the first moment is a linear statistic of the gradient and rotates like the
  core, ``m <- m x_i P_i^T``. The second moment is not rotation-covariant; we keep the diagonal of the
  rotated second-moment matrix, ``E[(P^T g)_k^2] = sum_j P_jk^2 v_j`` when the coordinates are uncorrelated:
  ``v <- v x_i (P_i * P_i)^T``. It is non-negative and exact when ``P`` is a permutation. The weights use the
  same convex combination (columns of ``P`` have unit norm), so a rotated entry inherits the history of the
  entries it is made of.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .orth import constant


@dataclass
class AdamMoments:
    """Debiased first/second moments and their bias-correction weights, all shaped like the core."""

    m: Tensor
    v: Tensor
    wm: Tensor
    wv: Tensor
    factors: list[AdamMoments | None] | None = None   # moments of each mode's K-gradient (None: not kept)

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.m, self.v, self.wm, self.wv


def adam_direction(grad: Tensor, state: AdamMoments, betas: tuple[float, float], eps: float
                   ) -> tuple[Tensor, AdamMoments]:
    """One Adam update of the moments; returns the step direction ``m / (sqrt(v) + eps)`` and the new state."""
    b1, b2 = betas
    wm = torch.add(constant(1 - b1, state.wm), state.wm, alpha=b1)              # b1 wm + (1 - b1)
    wv = torch.add(constant(1 - b2, state.wv), state.wv, alpha=b2)
    # m' = (b1 wm m + (1 - b1) g) / wm',   v' = (b2 wv v + (1 - b2) g^2) / wv'   (fused: fewer kernels)
    m = torch.addcmul(grad * (1 - b1), state.wm, state.m, value=b1) / wm
    v = torch.addcmul(state.wv * state.v, grad, grad, value=(1 - b2) / b2) / (wv / b2)
    return m / (v.sqrt() + eps), AdamMoments(m, v, wm, wv)


def transport_planes(X: Tensor, T: Tensor, active: Tensor | None = None) -> Tensor:
    """K-gradient moments in new column coordinates, all four planes in one matmul.

    ``X`` (B, 4, M, n, m): the planes m, v, wm, wv of M matrices ``(n, m)`` per batch entry; ``T`` (B, M, m, m') maps
    old to new columns; ``active`` (B, M, m) bool: the old columns with history (default all). ``m <- m T``;
    ``v, wm, wv <- (.) (T * T)``; a column's missing weight ``1 - sum_j T_jk^2`` (directions it did not have before)
    is filled with the row's mean ``v`` and ``wv`` over the active old columns (per ambient row, the rule of
    ``group_moments.pad_core_moments``). Returns (B, 4, M, n, m').
    """
    T2 = T * T
    out = X @ torch.stack([T, T2, T2, T2], 1)                                # (B, 4, M, n, m')
    missing = (1.0 - T2.sum(-2)).clamp_min(0.0)[:, None, :, None, :]       # (B, 1, M, 1, m')
    weight = torch.ones_like(T[..., 0]) if active is None else active.to(X.dtype)        # (B, M, m)
    count = weight.sum(-1).clamp_min(1.0)[:, None, :, None, None]
    means = (X[:, 1::2] * weight[:, None, :, None, :]).sum(-1, keepdim=True) / count    # (B, 2, M, n, 1): v, wv
    out[:, 1::2] += means * missing
    return out


def transport_columns(state: AdamMoments, T: Tensor, active: Tensor | None = None) -> AdamMoments:
    """:func:`transport_planes` of one matrix's moments ``(n, m)`` with ``T`` (m, m') and ``active`` (m,)."""
    X = torch.stack([t.expand_as(state.m) for t in state.tensors()])[None, :, None]         # (1, 4, 1, n, m)
    out = transport_planes(X, T[None, None], None if active is None else active.reshape(1, 1, -1))
    return AdamMoments(*out[0, :, 0])
