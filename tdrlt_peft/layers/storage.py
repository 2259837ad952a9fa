"""Fixed-size storage of one low-rank (Tucker) adapter (the tracker of a missing integrator step: ``tracker.py``).

Factors are stored at their maximal width ``R_i = min(r_max, n_i)`` and the core at ``(R_1, ..., R_d)``; the
active rank ``r_i`` selects the leading slices and every entry past it is zero. Parameter shapes therefore
never change, so optimisers, DDP gradient buckets and ``torch.compile`` stay valid while ranks move.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..math.adam import AdamMoments
from ..math.engine import RankBounds
from .rank_mirror import refresh
from .tracker import StepTracker


@dataclass(frozen=True)
class ParameterBudget:
    """At most ``target`` active parameters over every adapter that carries this budget (``layers/budget.py``);
    ``owner`` names where it was set (an adapter name of a PEFT model, or ``factorize``)."""

    target: int
    owner: str


@dataclass
class LowRankStorage:
    """A view of one adapter's tensors, as the integrator reads and writes them.

    ``core``: (R_1, ..., R_d) parameter; ``factors[i]``: (n_i, R_i) parameter, or None for a mode that is
    not factorized (then ``ranks[i] == n_i``); ``rank_buffer``: int64 (d,) buffer saved with the adapter;
    ``ranks``: the same as a Python list (the forward slices with it, no device sync); ``moments``: Adam
    state buffers shaped like ``core``; ``matrix``: a ``U S V^T`` adapter (Q = I, one shared rank).
    """

    name: str
    core: nn.Parameter
    factors: list[nn.Parameter | None]
    ranks: list[int]
    rank_buffer: Tensor
    bounds: RankBounds
    matrix: bool
    tracker: StepTracker
    moments: AdamMoments | None = None
    k_buffer: Tensor | None = None     # the K-gradient moments' buffer (4, sum_i n_i, R) behind moments.factors
    extra: dict = field(default_factory=dict)
    scale: float = 1.0                 # the constant output scale s of W0 + s ΔW (1: a factorized layer's weight)
    budget: ParameterBudget | None = None      # the parameter budget this adapter counts in (None: its tau rule)

    def active(self) -> tuple[Tensor, list[Tensor | None]]:
        """Active slices ``(core[:r_1, ..., :r_d], [U_i[:, :r_i]])`` (of the host widths, see ``rank_mirror.py``)."""
        refresh()
        core = self.core[tuple(slice(0, r) for r in self.ranks)]
        factors = [None if U is None else U[:, :r] for U, r in zip(self.factors, self.ranks)]
        return core, factors

    def storage_ranks(self) -> list[int]:
        return [self.core.shape[i] for i in range(self.core.dim())]

    def parameters(self) -> list[nn.Parameter]:
        return [self.core, *(U for U in self.factors if U is not None)]

    def num_active_parameters(self) -> int:
        """``sum_i n_i r_i + prod_i r_i`` over factorized modes (matrix: ``(out + in) r + r^2``), a host read."""
        count = 1
        ranks = self.host_ranks()
        for r in ranks:
            count *= r
        for U, r in zip(self.factors, ranks):
            if U is not None:
                count += U.shape[0] * r
        return count

    def host_ranks(self) -> list[int]:
        """The exact ranks, read from the device (a host read: for logging, saving and counting, not the step)."""
        return self.rank_buffer.tolist()

    def active_moments(self, dtype: torch.dtype) -> AdamMoments | None:
        """Active slices of the Adam state in ``dtype``: core moments and (if kept) K-gradient moments."""
        if self.moments is None:
            return None
        index = tuple(slice(0, r) for r in self.ranks)
        moments = AdamMoments(*(t[index].to(dtype) for t in self.moments.tensors()))
        if self.moments.factors is not None:
            moments.factors = [None if f is None else active_factor_moments(f, r, dtype)
                               for f, r in zip(self.moments.factors, self.ranks)]
        return moments

    @torch.no_grad()
    def write(self, core: Tensor, factors: list[Tensor | None], moments: AdamMoments | None) -> None:
        """Store new active tensors (zeros past the new ranks) and the new ranks. The new tensors may be views of
        this storage (its leading slices): they are copied before it is cleared."""
        ranks = list(core.shape)
        core = core.clone()
        factors = [None if new is None else new.clone() for new in factors]
        self.core.zero_()
        self.core[tuple(slice(0, r) for r in ranks)] = core.to(self.core.dtype)
        for U, new in zip(self.factors, factors):
            if U is not None:
                U.zero_()
                U[:, : new.shape[1]] = new.to(U.dtype)
        if moments is not None and self.moments is not None:
            for buf, new in zip(self.moments.tensors(), moments.tensors()):
                buf.zero_()
                buf[tuple(slice(0, r) for r in ranks)] = new.to(buf.dtype)
            if moments.factors is not None and self.moments.factors is not None:
                for stored, new in zip(self.moments.factors, moments.factors):
                    if stored is None or new is None:
                        continue
                    for buf, t in zip(stored.tensors(), new.tensors()):
                        buf.zero_()
                        buf[:, : t.shape[-1]] = t.to(buf.dtype)
        self.ranks[:] = ranks
        self.rank_buffer.copy_(torch.tensor(ranks, dtype=self.rank_buffer.dtype))


def factor_moment_views(buffer: Tensor | None, sizes: list[int], factored: list[bool]
                        ) -> list[AdamMoments | None] | None:
    """Per-mode views ``(n_i, R)`` of a K-gradient moment buffer ``(4, sum_i n_i, R)`` (factorized modes stacked
    by rows; m, v, wm, wv along the first dimension). None without a buffer."""
    if buffer is None:
        return None
    views: list[AdamMoments | None] = []
    row = 0
    for n, f in zip(sizes, factored):
        if not f:
            views.append(None)
            continue
        views.append(AdamMoments(*(buffer[k, row:row + n] for k in range(4))))
        row += n
    return views


def active_factor_moments(state: AdamMoments, width: int, dtype: torch.dtype | None = None) -> AdamMoments:
    """The first ``width`` columns of a K-gradient's moments; the weights ``wm``, ``wv`` as one row ``(1, width)``.

    Every operation on these moments (``adam_direction``, ``transport_columns``) acts on whole columns, so the
    weights are the same in every row: one row is read (and broadcast back on writing)."""
    return AdamMoments(state.m[:, :width].to(dtype), state.v[:, :width].to(dtype),
                       state.wm[:1, :width].to(dtype), state.wv[:1, :width].to(dtype))


def factor_moment_shape(sizes: list[int], widths: list[int], factored: list[bool]) -> list[int]:
    """Shape of the K-gradient moment buffer: ``(4, sum of factorized n_i, max of their widths)``."""
    return [4, sum(n for n, f in zip(sizes, factored) if f), max(w for w, f in zip(widths, factored) if f)]
