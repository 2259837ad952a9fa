"""The paper's rank-adaptive BUG step: augment, then a Galerkin step with a second forward/backward pass.

``docs/algorithm.md``, "The paper's own step". For every adapter, learning rate λ:

  1. augment with the first pass's K-gradients (exactly as ``step.py``):
         Û_i = [U_i, Ũ_i],   Ũ_i = orth((I - U_i U_i^T) G_Ki)
  2. write the augmented point into the fixed-size storage: factors ``Û_i`` in the columns ``:r̂_i``, core
     ``Ĉ0 = C x_i (Û_i^T U_i)`` = C zero-padded, so the layer weight W is unchanged there
  3. second forward/backward on the same batch (the ``closure``): the custom backward delivers
         core.grad = G x_1 Û_1^T ... x_d Û_d^T                      (matrix: Û^T G V̂)
  4. Galerkin step ``Ĉ = Ĉ0 - λ G x_i Û_i^T`` (Adam: the preconditioned direction), then the truncation of
     ``step.apply`` (SVD per mode, tau rule, rotate core, bases and Adam moments).

Matrix case: ``Ŝ = Û^T W V̂ - λ Û^T G V̂``. Compared with the parallel step, the only new entry is the block
``-λ Ũ^T G Ṽ`` (the parallel step leaves it zero); it is what the second pass pays for.

The matrix forward slices ``U``, ``S`` and ``V`` with one shared rank, so at the augmented point both sides
use the width ``w = max(r̂_1, r̂_2)`` and the narrower basis is padded with zero columns (the core is zero
there, so W and the gradient blocks that matter are unchanged). ``w`` must fit both storages: a matrix adapter
augments each side by at most ``min(R_1, R_2) - r`` columns. This only differs from the parallel step when one
side of the layer is narrower than ``r_max`` (``min(out, in) < r_max``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..layers.storage import LowRankStorage
from ..math.adam import AdamMoments, adam_direction, pad_moments
from ..math.geometry import augment_basis, compute_dtype
from ..math.step import Proposal, apply, pad_to, precondition_k_grads, truncation_proposal, unfolding_bases

if TYPE_CHECKING:
    from .integrator import TDLRTIntegrator


@dataclass
class AugmentedPoint:
    """One adapter between the two passes: its old state (to restore) and the augmented bases."""

    storage: LowRankStorage
    core: Tensor                         # C (r_1..r_d), compute dtype
    bases: list[Tensor | None]           # Û_i (n_i, r̂_i); None = mode not factorized
    sizes: list[int]                     # r̂_i (unfactorized modes: n_i)
    widths: list[int]                    # active widths written to the storage (matrix: max(r̂_1, r̂_2) twice)
    moments: AdamMoments | None          # Adam moments at the old ranks (K-gradient moments already updated)
    qs: list[Tensor | None] | None       # Q_i of the old core (K-gradient columns); None without their moments
    saved: tuple[Tensor, list[Tensor | None], list[int], list[Tensor]]   # storage before the step (+ Adam buffers)


def augment(s: LowRankStorage, adam: dict | None) -> AugmentedPoint:
    """Step 1 from the first pass's gradients in ``s``'s ``.grad`` (nothing is written)."""
    dtype = compute_dtype(s.core.dtype)
    core, factors = s.active()
    ranks = list(s.ranks)
    caps = s.storage_ranks()
    if s.matrix:
        # both sides share one active width at the augmented point (see the module docstring)
        caps = [min(caps)] * len(caps)
    moments = s.active_moments(dtype) if adam is not None else None
    k_grads = [None if U is None else s.factors[i].grad[:, :r].to(dtype)
               for i, (U, r) in enumerate(zip(factors, ranks))]
    qs = None
    if moments is not None and moments.factors is not None:
        # Adam-preconditioned K-gradients span the new directions, as in the parallel step (adam.py); their
        # columns are Q_i's (as many as Q_i has)
        qs = unfolding_bases(core.to(dtype), [U is not None for U in factors], s.matrix)
        k_grads = [G if G is None or Q is None else G[:, : Q.shape[1]] for G, Q in zip(k_grads, qs)]
        k_grads, moments.factors = precondition_k_grads(k_grads, moments, adam)
    bases: list[Tensor | None] = []
    for i, (U, r) in enumerate(zip(factors, ranks)):
        if U is None:
            bases.append(None)
            continue
        U = U.to(dtype)
        new = augment_basis(U, k_grads[i], min(r, caps[i] - r))  # at most r new columns, never past the storage
        bases.append(torch.cat([U, new], dim=1))
    sizes = [core.shape[i] if U is None else U.shape[1] for i, U in enumerate(bases)]
    widths = [max(sizes)] * len(sizes) if s.matrix else list(sizes)
    buffers = [] if s.moments is None else [t.clone() for t in _moment_buffers(s)]
    saved = (s.core.detach().clone(), [None if U is None else U.detach().clone() for U in s.factors], ranks, buffers)
    return AugmentedPoint(s, core.to(dtype), bases, sizes, widths, moments, qs, saved)


def _moment_buffers(s: LowRankStorage) -> list[Tensor]:
    """Every Adam buffer of ``s`` (core moments, then the K-gradient moments' views)."""
    buffers = list(s.moments.tensors())
    for f in s.moments.factors or []:
        if f is not None:
            buffers.extend(f.tensors())
    return buffers


@torch.no_grad()
def write_augmented_point(point: AugmentedPoint) -> None:
    """Step 2: factors ``[U_i, Ũ_i, 0...]`` and the zero-padded core ``Ĉ0`` at the active widths (W unchanged)."""
    factors = [None if U is None else pad_to(U, (U.shape[0], w)) for U, w in zip(point.bases, point.widths)]
    point.storage.write(pad_to(point.core, point.widths), factors, None)


@torch.no_grad()
def restore(point: AugmentedPoint) -> None:
    """Put the storage back exactly as it was before the step."""
    core, factors, ranks, buffers = point.saved
    s = point.storage
    s.core.copy_(core)
    for U, old in zip(s.factors, factors):
        if U is not None:
            U.copy_(old)
    for buffer, old in zip(() if s.moments is None else _moment_buffers(s), buffers):
        buffer.copy_(old)
    s.ranks[:] = ranks
    s.rank_buffer.copy_(torch.tensor(ranks, dtype=s.rank_buffer.dtype))


@torch.no_grad()
def galerkin_proposal(point: AugmentedPoint, core_grad: Tensor, lr: float, adam: dict | None) -> Proposal:
    """Step 4 before the rank agreement: ``Ĉ = Ĉ0 - λ Ĝ`` with ``Ĝ = G x_i Û_i^T``, and the per-mode SVDs."""
    core_hat0 = pad_to(point.core, point.sizes)                 # Ĉ0 = C zero-padded, (r̂_1, ..., r̂_d)
    moments = None
    if adam is None or point.moments is None:
        core_hat = core_hat0 - lr * core_grad
    else:
        moments = pad_moments(point.moments, point.sizes)
        direction, moments = adam_direction(core_grad, moments, adam["betas"], adam["eps"])
        moments.factors = point.moments.factors
        core_hat = core_hat0 - lr * (direction + adam.get("weight_decay", 0.0) * core_hat0)
    return truncation_proposal(core_hat, point.bases, point.storage.bounds, point.storage.storage_ranks(),
                               point.storage.matrix, moments, point.qs, list(point.core.shape))


def bug_step(integrator: TDLRTIntegrator, lr: float, closure: Callable[[], Tensor | float | None]) -> bool:
    """One BUG step for every adapter of ``integrator.model``; see ``TDLRTIntegrator.step``.

    First pass: the gradients already in the adapters' ``.grad``; when no adapter has one, ``closure()`` is
    called for it first. Second pass: ``closure()`` at the augmented point. Gradients of the other trainable
    parameters are restored to their first-pass values afterwards (the second pass would double them).
    Atomic: any exception restores every adapter (and re-raises); a non-finite gradient in either pass skips
    the step for every adapter. Returns whether the step was taken.
    """
    from ..layers.inventory import iter_storages
    from ..math.threads import single_threaded_linalg
    from .integrator import _agree, _all_finite

    model = integrator.model
    lr = float(lr) * integrator.lr_factor
    points: list[AugmentedPoint] = []
    other_grads: dict[nn.Parameter, Tensor | None] = {}
    try:
        if not any(s.core.grad is not None for s in iter_storages(model)):
            with torch.enable_grad():
                closure()
        storages = [s for s in iter_storages(model) if s.core.grad is not None]
        if not storages:
            raise RuntimeError("TDLRT BUG step: the closure did not backpropagate through any TDLRT adapter.")
        if not _all_finite([p.grad for s in storages for p in s.parameters() if p.grad is not None]):
            _skip(integrator)
            return False
        with torch.no_grad(), single_threaded_linalg(storages[0].core.device):
            adam = integrator.adam if integrator.core_optimizer == "adam" else None
            points = [augment(s, adam) for s in storages]
        stored = {id(p) for s in iter_storages(model) for p in s.parameters()}
        other_grads = {p: None if p.grad is None else p.grad.clone() for p in model.parameters()
                       if p.requires_grad and id(p) not in stored}
        for point in points:
            write_augmented_point(point)
            for p in point.storage.parameters():
                p.grad = None
            point.storage.tracker.after_step()                 # the factors changed on purpose
        with torch.enable_grad():
            closure()
        grads = [_second_pass_grad(point) for point in points]
        if not _all_finite(grads):
            for point in points:
                restore(point)
            _skip(integrator)
            return False
        adam = integrator.adam if integrator.core_optimizer == "adam" else None
        with torch.no_grad(), single_threaded_linalg(storages[0].core.device):
            proposals = [galerkin_proposal(point, g, lr, adam) for point, g in zip(points, grads)]
            ranks = _agree([p.ranks for p in proposals])
            results = [apply(p, k) for p, k in zip(proposals, ranks)]
            for point, (core, factors, moments) in zip(points, results):
                point.storage.write(core, factors, moments)
        integrator.num_steps += 1
        return True
    except BaseException:
        for point in points:
            restore(point)
        raise
    finally:
        for p, g in other_grads.items():
            p.grad = g
        integrator.zero_grad()


def _second_pass_grad(point: AugmentedPoint) -> Tensor:
    """``G x_i Û_i^T`` from the second pass: the core gradient's leading ``r̂_1 x ... x r̂_d`` block."""
    grad = point.storage.core.grad
    if grad is None:
        raise RuntimeError(f"TDLRT BUG step: the closure did not backpropagate through adapter "
                           f"{point.storage.name!r}; it must recompute the loss on the same batch.")
    return grad[tuple(slice(0, r) for r in point.sizes)].to(point.core.dtype)


def _skip(integrator: TDLRTIntegrator) -> None:
    integrator.num_skipped += 1
    if not integrator._warned_skip:
        warnings.warn("TDLRT: non-finite adapter gradients, skipping the step for every adapter "
                      "(an fp16 loss-scale overflow does this routinely; said once).", stacklevel=3)
        integrator._warned_skip = True
