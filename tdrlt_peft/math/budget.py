"""A parameter budget for the truncation: one threshold on the singular values of every adapter of a model.

Budget mode replaces each adapter's tau rule (``geometry.truncation_ranks``) by one decision over the whole model.
The candidate directions are, for adapter b and adaptive mode i, the columns j of the step's truncation
(``engine.Proposal.eig``), scored by the squared singular value of the change they make to the layer:

    score_bij = (s_b σ_bij)^2,     σ_bij = j-th singular value of Mat_i(Ĉ_b)

with s_b the adapter's constant output scale (``W0 + s ΔW``; 1 for a factorized layer, whose weight is the Tucker
tensor itself). The bases are orthonormal, so σ_bij are the mode-i singular values of ΔW_b (a matrix adapter: the
singular values of ΔW_b = U S V^T) and s_b σ_bij those of the layer's own update: the same scale for every layer,
whatever its size, rank or ``scale``. Singular values below ``ZERO_SV_FACTOR eps σ_bi1`` and columns past the
adapter's cap are not candidates. For a threshold t every adaptive mode keeps its columns scored >= t:

    k_bi(t) = clamp(#{j : score_bij >= t}, r_min_b, cap_bi)        (unfactorized modes: k_bi = n_bi)

and the budget keeps as many as fit: the smallest candidate t (a score, or +inf: every adapter at r_min) with

    P(t) = sum_b [ sum_{i factorized} n_bi k_bi(t) + prod_i k_bi(t) ] <= N.

P(t), the active parameter count after the step (``algorithm.md``, "Storage and rank"), is non-increasing in t, so
the kept directions are the largest singular values of the whole model (equal scores enter together), each paying
what it adds: a matrix's k-th direction ``out + in + 2k - 1``, exactly; a Tucker mode-i direction its column
``n_i`` plus the core slice ``prod_{l != i} k_bl(t)`` at the ranks the same threshold gives the other modes (one
threshold for every mode of every adapter, so P(t) is exact for Tucker adapters too). Below the budget's reach a
step keeps its r_min floors (the caller refuses budgets under that floor before training).

Device work: a constant number of ops per group of adapters (one ``searchsorted`` of all candidates against the
group's scores, a clamp, a product), one ``amin`` for the whole model and one more ``searchsorted`` per group at the
chosen threshold; no host read. Memory: (rows of all groups) x (number of candidates) integers. A step with no
candidate anywhere (every core zero) keeps the ranks it started from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .engine import Proposal
from .geometry import ZERO_SV_FACTOR, eps
from .orth import positions


@dataclass
class Spectrum:
    """One group's candidate directions: ``scores`` (B, F, W) for its F rank rows (a matrix: one row, its shared
    rank; a Tucker adapter: one per factorized mode), non-increasing along W, ``-inf`` where no candidate;
    ``row_of_mode[i]``: the row that gives mode i's rank, None for an unfactorized mode (``k = n``); ``sizes``
    (B, d) the modes' sizes n_bi; ``r_min`` (B,); ``caps`` (B, F); ``member`` (B,) bool: whether the adapter is in
    the budget (the others cost nothing here and keep their own rule); ``current`` (B, d): the ranks before the
    step (None: every row at ``r_min`` in that case)."""

    scores: Tensor
    row_of_mode: list[int | None]
    sizes: Tensor
    r_min: Tensor
    caps: Tensor
    member: Tensor
    current: Tensor | None = None


def direction_scores(values: Tensor, scale: Tensor, cap: Tensor) -> Tensor:
    """``(s σ_j)^2`` from ``values = σ_j^2`` (R, W) (descending up to round-off), ``-inf`` at ``j >= cap`` and at
    ``σ_j <= ZERO_SV_FACTOR eps σ_1`` (round-off, as in ``truncation_ranks``), made non-increasing along j (a
    running minimum: a count of scores >= t is then a leading block of columns)."""
    cutoff = (ZERO_SV_FACTOR * eps(values.dtype)) ** 2 * values.amax(-1, keepdim=True)
    j = positions(values.shape[-1], values.device)
    valid = (values > cutoff) & (j[None, :] < cap[:, None])
    scores = torch.where(valid, values * (scale * scale)[:, None], -torch.inf)
    return scores.cummin(-1).values


def proposal_spectrum(proposal: Proposal, scale: Tensor, r_min: Tensor, storage_cap: Tensor, sizes: Tensor,
                      member: Tensor) -> Spectrum:
    """The :class:`Spectrum` of one group's step. ``storage_cap`` (B, d): ``min(r_max, R_i)`` of each adapter's own
    storage (a matrix: ``min(r_max, R_1, R_2)``); the caps add the augmented ranks r̂ and, for Tucker, the rank
    bound of an unfolding ``prod_{j != i} r̂_j`` (the caps of ``engine.truncation_proposal``)."""
    augmented = proposal.augmented
    if proposal.group.matrix:
        values = proposal.eig[0][0]
        cap = torch.minimum(storage_cap[:, 0], augmented.amin(-1))
        scores = direction_scores(values, scale, cap)[:, None]                      # (B, 1, W)
        return Spectrum(scores, [0, 0], sizes, r_min, cap[:, None], member, proposal.group.ranks)
    total = augmented.prod(-1)
    rows, caps, row_of_mode = [], [], []
    width = max(pair[0].shape[-1] for pair in proposal.eig if pair is not None)
    for i, pair in enumerate(proposal.eig):
        if pair is None:
            row_of_mode.append(None)
            continue
        cap = torch.minimum(torch.minimum(storage_cap[:, i], augmented[:, i]), total // augmented[:, i].clamp_min(1))
        scores = direction_scores(pair[0], scale, cap)
        rows.append(torch.nn.functional.pad(scores, (0, width - scores.shape[-1]), value=-torch.inf))
        caps.append(cap)
        row_of_mode.append(len(rows) - 1)
    return Spectrum(torch.stack(rows, 1), row_of_mode, sizes, r_min, torch.stack(caps, 1), member,
                    proposal.group.ranks)


def row_ranks(spectrum: Spectrum, thresholds: Tensor) -> Tensor:
    """``k(t)`` (B, F, T) of every rank row for each threshold in ``thresholds`` (T,):
    ``clamp(#{j : score_j >= t}, r_min, cap)``."""
    B, F, _ = spectrum.scores.shape
    # non-decreasing, +inf past the candidates; compared in the thresholds' dtype (the widest of the model)
    ascending = (-spectrum.scores.to(thresholds.dtype)).reshape(B * F, -1)
    # #{j : score_j >= t} = #{j : -score_j <= -t}
    count = torch.searchsorted(ascending, (-thresholds).expand(B * F, -1).contiguous(), right=True)
    count = count.reshape(B, F, -1)
    return torch.clamp(count, spectrum.r_min[:, None, None], spectrum.caps[:, :, None])


def mode_ranks(spectrum: Spectrum, rows: Tensor) -> list[Tensor]:
    """Per mode i, ``k_bi`` (B, T) from the row ranks (B, F, T); an unfactorized mode: its size ``n_bi``."""
    return [spectrum.sizes[:, i, None].expand(-1, rows.shape[-1]) if r is None else rows[:, r]
            for i, r in enumerate(spectrum.row_of_mode)]


def spectrum_parameters(spectrum: Spectrum, rows: Tensor) -> Tensor:
    """``P_b = sum_{i factorized} n_bi k_bi + prod_i k_bi`` per adapter and threshold (B, T), 0 for non-members."""
    ranks = mode_ranks(spectrum, rows)
    count = torch.stack(ranks, -1).prod(-1)
    for i, (k, r) in enumerate(zip(ranks, spectrum.row_of_mode)):
        if r is not None:
            count = count + spectrum.sizes[:, i, None] * k
    return count * spectrum.member[:, None]


def budget_ranks(spectra: list[Spectrum], target: int | Tensor) -> list[Tensor]:
    """The ranks (B, d) of every group under the budget ``P <= target`` (module docstring); entries of non-members
    are meaningless (the caller keeps their own rule's)."""
    dtype = spectra[0].scores.dtype
    for s in spectra[1:]:
        dtype = torch.promote_types(dtype, s.scores.dtype)
    device = spectra[0].scores.device
    flat = torch.cat([torch.full((1,), torch.inf, dtype=dtype, device=device)]
                     + [s.scores.to(dtype).reshape(-1) for s in spectra])
    thresholds = torch.where(torch.isfinite(flat), flat, torch.inf)          # (T,): every score, and +inf
    total = sum(spectrum_parameters(s, row_ranks(s, thresholds)).sum(0) for s in spectra)     # P(t) (T,)
    # the smallest feasible threshold (+inf, all at r_min, when none is: the floor the caller checked)
    chosen = torch.where(total <= target, thresholds, torch.inf).amin().reshape(1)
    # no candidate anywhere: every core is zero (a step of learning rate 0, as the first of a linear warm-up), so
    # the step changes nothing and keeps the ranks it started from (which met the budget)
    moved = torch.isfinite(flat[1:]).any()
    out = []
    for s in spectra:
        ranks = torch.stack(mode_ranks(s, row_ranks(s, chosen)), -1)[:, 0]  # (B, d)
        out.append(ranks if s.current is None else torch.where(moved, ranks, s.current))
    return out


def parameter_count(sizes: list[int], factored: list[bool], ranks: list[int]) -> int:
    """``sum_{i factorized} n_i r_i + prod_i r_i`` of one adapter (host ints; unfactorized modes: r_i = n_i)."""
    count = 1
    for n, f, r in zip(sizes, factored, ranks):
        count *= r if f else n
    return count + sum(n * r for n, f, r in zip(sizes, factored, ranks) if f)


def parameter_range(adapters: list[tuple[list[int], list[bool], bool, int, int]]) -> tuple[int, int]:
    """The budgets adapters can meet, ``(floor, ceiling)``: every adapter at ``r_min``, at its largest ranks.

    ``adapters``: ``(sizes, factored, matrix, r_min, r_max)`` each. The widths are ``R_i = min(r_max, n_i)`` (a
    matrix: one rank ``min(r_max, n_1, n_2)``); a Tucker mode's rank is at most ``prod_{j != i} R_j`` too."""
    floor = ceiling = 0
    for sizes, factored, matrix, r_min, r_max in adapters:
        widths = [min(r_max, n) if f else n for n, f in zip(sizes, factored)]
        if matrix:
            widths = [min(widths)] * len(widths)
            top = widths
        else:
            total = 1
            for w in widths:
                total *= w
            top = [min(w, total // w) if f else w for w, f in zip(widths, factored)]
        floor += parameter_count(sizes, factored, [min(r_min, w) for w in top])
        ceiling += parameter_count(sizes, factored, top)
    return floor, ceiling
