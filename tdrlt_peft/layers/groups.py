"""Adapters grouped by storage shape for the step engine: stacked reads and masked, all-or-nothing writes.

``gather`` stacks the tensors of same-shaped adapters (one op per tensor kind, whatever the number of adapters)
into a ``math.engine.Group``; ``write`` puts a new group back with one ``_foreach_copy_`` per tensor kind, each
value chosen on the device by ``torch.where(ok, new, old)``: a step whose gradients were not finite writes the old
values back, without the host ever reading ``ok``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..math.adam import AdamMoments
from ..math.engine import Bounds, Group, factor_views
from ..math.geometry import compute_dtype
from .storage import LowRankStorage


def group_key(s: LowRankStorage) -> tuple:
    """Adapters with equal keys are stepped together: same storage shapes, kind, dtype, device and state."""
    return (tuple(s.core.shape), tuple(None if U is None else tuple(U.shape) for U in s.factors), s.matrix,
            s.core.dtype, s.core.device, s.moments is not None, s.k_buffer is not None)


def partition(storages: list[LowRankStorage]) -> list[list[LowRankStorage]]:
    groups: dict[tuple, list[LowRankStorage]] = {}
    for s in storages:
        groups.setdefault(group_key(s), []).append(s)
    return list(groups.values())


def bounds_of(storages: list[LowRankStorage]) -> Bounds:
    """The rank rules as device tensors (B,) (built once per group by the caller's cache)."""
    device = storages[0].core.device
    dtype = compute_dtype(storages[0].core.dtype)
    return Bounds(tau=torch.tensor([s.bounds.tau for s in storages], dtype=dtype, device=device),
                  r_min=torch.tensor([s.bounds.r_min for s in storages], device=device),
                  r_max=torch.tensor([s.bounds.r_max for s in storages], device=device),
                  absolute=torch.tensor([s.bounds.absolute for s in storages], device=device))


@dataclass
class Gathered:
    group: Group
    core_grad: Tensor | None
    k_grads: list[Tensor | None]
    k_buffer: Tensor | None = None     # the stacked K-moment buffers (B, 4, sum_i n_i, W) behind group.k_moments
    widths: list[int] | None = None    # the leading core slice the step works on (see step_widths)


def step_widths(storages: list[LowRankStorage], full: bool = False) -> list[int]:
    """Per mode, how many leading columns the step needs: ``min(R_i, 2 max_b w_b)`` with ``w_b`` an adapter's host
    width (at least its rank, ``rank_mirror.py``), since a step at most doubles a rank; columns past it are zero
    before and after the step. ``full``: the whole storage (fixed shapes, for a CUDA graph)."""
    first = storages[0]
    shape = list(first.core.shape)
    if full:
        return shape
    return [n if U is None else min(n, 2 * max(s.ranks[i] for s in storages)) for i, (U, n) in
            enumerate(zip(first.factors, shape))]


def _stack(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    return torch.stack(tensors).to(dtype)


def k_layout(factors: list) -> list[tuple[int, int, int] | None]:
    """(first row, n_i, width) of each factorized mode ``(B, n_i, width)`` in a K-moment buffer (factorized modes
    stacked by rows)."""
    layout: list[tuple[int, int, int] | None] = []
    row = 0
    for U in factors:
        if U is None:
            layout.append(None)
            continue
        layout.append((row, U.shape[-2], U.shape[-1]))
        row += U.shape[-2]
    return layout


def gather(storages: list[LowRankStorage], with_moments: bool, with_grads: bool = True, full: bool = False
           ) -> Gathered:
    """Stack one group's tensors in the compute dtype (float32 for half-precision storage), sliced to the leading
    :func:`step_widths` (no copy of the zero columns past them)."""
    first = storages[0]
    dtype = compute_dtype(first.core.dtype)
    widths = step_widths(storages, full)
    index = tuple(slice(0, w) for w in widths)
    core = _stack([s.core[index] for s in storages], dtype)
    factors = [None if U is None else _stack([s.factors[i][:, :w] for s in storages], dtype)
               for i, (U, w) in enumerate(zip(first.factors, widths))]
    group = Group(core=core, factors=factors, ranks=torch.stack([s.rank_buffer for s in storages]),
                  matrix=first.matrix)
    buffer = None
    if with_moments and first.moments is not None:
        group.moments = AdamMoments(*(_stack([t[index] for t in ts], dtype)
                                      for ts in zip(*(s.moments.tensors() for s in storages))))
        if first.k_buffer is not None:
            width = max(w for U, w in zip(first.factors, widths) if U is not None)
            buffer = _stack([s.k_buffer[..., :width] for s in storages], dtype)       # (B, 4, sum n_i, W)
            group.k_moments = AdamMoments(*buffer.unbind(1))
            group.k_layout = k_layout(factors)
            group.moments.factors = factor_views(group.k_moments, group.k_layout)
    if not with_grads:
        return Gathered(group, None, [], buffer, widths)
    core_grad = _stack([s.core.grad[index] for s in storages], dtype)
    k_grads = [None if U is None else _stack([s.factors[i].grad[:, :w] for s in storages], dtype)
               for i, (U, w) in enumerate(zip(first.factors, widths))]
    return Gathered(group, core_grad, k_grads, buffer, widths)


def _copy(ok: Tensor | None, targets: list[Tensor], new: Tensor, old: Tensor | None) -> None:
    """Copy ``new`` (stacked) into ``targets`` in their dtype, or ``old`` (the stacked values before the step, read
    by ``gather``) where ``ok`` is False."""
    if ok is not None:
        new = torch.where(ok, new, old if old is not None else torch.stack(targets))
    torch._foreach_copy_(targets, list(new.to(targets[0].dtype).unbind(0)))


def stacked_factor_buffer(factors: list[AdamMoments | None], width: int) -> Tensor:
    """Inverse of ``engine.factor_views`` on a stacked buffer: ``(B, 4, sum_i n_i, width)``, the weights broadcast
    to every row."""
    blocks = []
    for state in factors:
        if state is None:
            continue
        m, v, wm, wv = state.tensors()
        block = torch.stack([m, v, wm.expand_as(m), wv.expand_as(m)], 1)              # (B, 4, n_i, R_i)
        blocks.append(torch.nn.functional.pad(block, (0, width - block.shape[-1])) if block.shape[-1] < width
                      else block)
    return torch.cat(blocks, 2) if len(blocks) > 1 else blocks[0]


@torch.no_grad()
def write(storages: list[LowRankStorage], new: Group, ok: Tensor | None = None, old: Gathered | None = None) -> None:
    """Store ``new`` (zeros past its ranks) in the leading slices of every adapter of the group (the shape of
    ``new``; the columns past it are zero and stay so), or keep the old values where ``ok`` is a False (0-dim bool)
    tensor (``old``: the group as gathered before the step). The host rank mirrors are not touched
    (``rank_mirror.py``)."""
    first = storages[0]
    before = None if old is None else old.group
    index = tuple(slice(0, w) for w in new.core.shape[1:])
    _copy(ok, [s.core[index] for s in storages], new.core, None if before is None else before.core)
    for i, U in enumerate(new.factors):
        if U is not None:
            _copy(ok, [s.factors[i][:, :U.shape[-1]] for s in storages], U,
                  None if before is None else before.factors[i])
    if new.moments is not None and first.moments is not None:
        olds = [None] * 4 if before is None or before.moments is None else list(before.moments.tensors())
        for j, t in enumerate(new.moments.tensors()):
            _copy(ok, [s.moments.tensors()[j][index] for s in storages], t, olds[j])
        if new.moments.factors is not None and first.k_buffer is not None:
            width = max(U.shape[-1] for U in new.factors if U is not None)
            _copy(ok, [s.k_buffer[..., :width] for s in storages], stacked_factor_buffer(new.moments.factors, width),
                  None if old is None else old.k_buffer)
    _copy(ok, [s.rank_buffer for s in storages], new.ranks, None if before is None else before.ranks)
