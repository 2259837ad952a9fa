"""The paper's rank-adaptive BUG step: augment, then a Galerkin step with a second forward/backward pass.

``docs/algorithm.md``, "The paper's own step". For every group of adapters, learning rate λ, with the step
engine's own pieces (``math/engine.py``):

  1. augment with the first pass's K-gradients (``engine.augment``, as in the parallel step):
         Û_i = U_i + Ũ_i Σ_i,   Ũ_i = orth((I - U_i U_i^T) G_Ki)
  2. write the augmented point into the fixed-size storage: factors ``Û_i``, rank r̂, the core unchanged
     (C zero-padded is ``Ĉ0 = C x_i (Û_i^T U_i)``), so the layer weight W is unchanged there
  3. second forward/backward on the same batch (the ``closure``): the custom backward delivers
         core.grad = G x_1 Û_1^T ... x_d Û_d^T                      (matrix: Û^T G V̂)
  4. Galerkin step ``Ĉ = Ĉ0 - λ G x_i Û_i^T`` (Adam: the preconditioned direction), then the truncation of the
     parallel step (``engine.truncation_proposal`` and ``engine.apply``).

Matrix adapters slice ``U``, ``S`` and ``V`` with one shared width, so each side augments to at most
``min(R_1, R_2)`` columns (this only differs from the parallel step when a side is narrower than ``r_max``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..layers import rank_mirror
from ..layers.groups import gather, write
from ..layers.inventory import iter_storages
from ..layers.storage import LowRankStorage
from ..math import engine
from ..math.adam import adam_direction
from ..math.group_moments import pad_core_moments, precondition
from ..math.masks import block_mask
from ..math.threads import single_threaded_linalg
from .integrator import all_finite

if TYPE_CHECKING:
    from .integrator import TDLRTIntegrator


@dataclass
class AugmentedGroup:
    """One group between the two passes: the group before the step (to restore) and its augmented point."""

    storages: list[LowRankStorage]
    bounds: engine.Bounds
    old: engine.Group                  # before the step (stacked copies)
    point: engine.Group                # Û_i, C, r̂: what the second pass runs at
    qs: list[Tensor | None]
    k_buffer: Tensor | None            # the K-gradient moments after this step's update (Adam)


def augment_group(storages: list[LowRankStorage], bounds: engine.Bounds, adam: dict | None) -> AugmentedGroup:
    """Step 1 from the first pass's gradients (nothing is written)."""
    g = gather(storages, with_moments=adam is not None)
    group = g.group
    factored = [U is not None for U in group.factors]
    qs = engine.row_space_bases(group.core, group.ranks, factored, group.matrix)
    k_dirs, k_buffer = precondition(group.k_buffer, group.k_layout, g.k_grads, adam, g.k_grad_rows)
    # a matrix's sides share one slicing width at the augmented point
    caps = bounds.cap
    if group.matrix:
        caps = caps.amin(-1, keepdim=True).clamp_max(min(U.shape[-1] for U in group.factors)).expand_as(caps)
    new, shifts, augmented = engine.augment(group, k_dirs, caps)
    bases = [None if U is None else torch.baddbmm(U, N, S) for U, N, S in zip(group.factors, new, shifts)]
    point = engine.Group(core=group.core, factors=bases, ranks=augmented, matrix=group.matrix, moments=group.moments,
                         k_buffer=group.k_buffer, k_layout=group.k_layout)
    return AugmentedGroup(storages, bounds, group, point, qs, k_buffer)


def galerkin_proposal(aug: AugmentedGroup, core_grad: Tensor, lr: float | Tensor, adam: dict | None
                      ) -> engine.Proposal:
    """Step 4 before the rank agreement: ``Ĉ = Ĉ0 - λ Ĝ`` with ``Ĝ = G x_i Û_i^T``, and the eigenpairs."""
    group = aug.old
    moments = None
    if adam is None or group.moments is None:
        core_hat = group.core - lr * core_grad
    else:
        old = block_mask(group.ranks, list(group.core.shape[1:]))
        direction, moments = adam_direction(core_grad, pad_core_moments(group.moments, old), adam["betas"],
                                            adam["eps"])
        core_hat = engine.adam_core_update(group.core, direction, aug.point.ranks, lr, adam)
    return engine.truncation_proposal(group, aug.point.factors, core_hat, aug.point.ranks, aug.bounds, moments,
                                      aug.qs, aug.k_buffer)


def bug_step(integrator: TDLRTIntegrator, lr: float | Tensor, closure: Callable[[], Tensor | float | None]) -> bool:
    """One BUG step for every adapter of ``integrator.model``; see ``TDLRTIntegrator.step``.

    First pass: the gradients already in the adapters' ``.grad``; when no adapter has one, ``closure()`` is
    called for it first. Second pass: ``closure()`` at the augmented point. Gradients of the other trainable
    parameters are restored to their first-pass values afterwards (the second pass would double them).
    Atomic: any exception restores every adapter (and re-raises); a non-finite gradient in either pass skips
    the step for every adapter. Returns whether the step was taken (a host read: the BUG step decides on the host
    whether to run its second pass).
    """
    model = integrator.model
    lr = lr * integrator.lr_factor
    adam = integrator.adam
    groups: list[AugmentedGroup] = []
    other_grads: dict[nn.Parameter, Tensor | None] = {}
    try:
        if not any(s.core.grad is not None for s in iter_storages(model)):
            with torch.enable_grad():
                closure()
        storages = [s for s in iter_storages(model) if s.core.grad is not None]
        if not storages:
            raise RuntimeError("TDLRT BUG step: the closure did not backpropagate through any TDLRT adapter.")
        if not bool(all_finite([p.grad for s in storages for p in s.parameters() if p.grad is not None])):
            return integrator.skip_step()
        with torch.no_grad(), single_threaded_linalg(storages[0].core.device):
            groups = [augment_group(part, integrator.step_bounds(bounds), adam)
                      for part, bounds in integrator.groups(storages)]
        stored = {id(p) for s in iter_storages(model) for p in s.parameters()}
        other_grads = {p: None if p.grad is None else p.grad.clone() for p in model.parameters()
                       if p.requires_grad and id(p) not in stored}
        for aug in groups:
            write(aug.storages, aug.point)
            for s in aug.storages:
                s.ranks[:] = [n if U is None else U.shape[1] for U, n in zip(s.factors, s.core.shape)]
                if s.matrix:
                    s.ranks[:] = [min(s.ranks)] * 2
                for p in s.parameters():
                    p.grad = None
                s.tracker.after_step()                          # the factors changed on purpose
        with torch.enable_grad():
            closure()
        grads = [_second_pass_grad(aug) for aug in groups]
        if not bool(all_finite(grads)):
            _restore(groups, integrator)
            return integrator.skip_step()
        with torch.no_grad(), single_threaded_linalg(storages[0].core.device):
            proposals = [galerkin_proposal(aug, g, lr, adam) for aug, g in zip(groups, grads)]
            ranks = integrator.rank_decision([(aug.storages, aug.bounds) for aug in groups], proposals,
                                             [aug.old.ranks for aug in groups])
            for aug, proposal, agreed in zip(groups, proposals, ranks):
                write(aug.storages, engine.apply(proposal, agreed))
        integrator._taken += 1
        integrator.publish(storages)
        rank_mirror.refresh()
        return True
    except BaseException:
        _restore(groups, integrator)
        raise
    finally:
        for p, g in other_grads.items():
            p.grad = g
        integrator.zero_grad()


@torch.no_grad()
def _restore(groups: list[AugmentedGroup], integrator: TDLRTIntegrator) -> None:
    """Put every storage back exactly as it was before the step."""
    for aug in groups:
        write(aug.storages, aug.old)
    if groups:
        integrator.publish([s for aug in groups for s in aug.storages])
        rank_mirror.refresh()                  # the BUG step reads on the host anyway: exact widths at once


def _second_pass_grad(aug: AugmentedGroup) -> Tensor:
    """``G x_i Û_i^T`` from the second pass (the core gradients, stacked)."""
    for s in aug.storages:
        if s.core.grad is None:
            raise RuntimeError(f"TDLRT BUG step: the closure did not backpropagate through adapter {s.name!r}; "
                               "it must recompute the loss on the same batch.")
    index = tuple(slice(0, w) for w in aug.old.core.shape[1:])              # the step's widths (gather)
    return torch.stack([s.core.grad[index] for s in aug.storages]).to(aug.old.core.dtype)
