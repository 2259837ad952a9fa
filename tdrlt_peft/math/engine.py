"""The TDLRT step engine: one implementation for a group of adapters of one shape, whatever their ranks.

A group stacks B adapters along a leading dimension. Every tensor has its fixed storage width (``R_i`` per mode)
with zeros past the adapter's rank, and the ranks are a device tensor ``(B, d)``: nothing here reads a value on
the host, so the step can run on a GPU stream without a synchronisation (and be captured in a CUDA graph). One
adapter is a group of one. Notation of ``docs/algorithm.md``; a matrix ``U S V^T`` is the Tucker tensor
``(S, [U, V])`` with ``Q = I`` and one shared rank.

    1. augment   Ũ_i = orth((I - U_i U_i^T) D_i),  D_i = G_Ki (Adam: its preconditioned direction), at most
                 min(r_i, R_i - r_i) columns;  Û_i = U_i + Ũ_i Σ_i  (Σ_i shifts Ũ's columns to positions r_i, ...)
    2. core      Ĉ = C - lr Ĝ,  Ĝ = G_C + Σ_i Ten_i(Ũ_i^T G_Ki Q_i^T) x_i Σ_i^T      (Adam: preconditioned Ĝ)
    3. truncate  Mat_i(Ĉ) Mat_i(Ĉ)^T = P_i Λ_i P_i^T (one batched eigh for all modes), k_i by the tau rule on Λ_i,
                 C <- Ĉ x_i P_ik^T,  U_i <- Û_i P_ik,  then one Newton-Schulz step against round-off drift.

Linear-algebra calls per group: one ``eigh`` for the augmentation of all modes, one for the truncation (Tucker
adds a QR per mode for ``Q_i``, and one more with Adam's K-gradient moments). Steps 1-2 and the eigenvalues of 3
are :func:`propose`; the ranks may then be agreed on across processes; :func:`apply` finishes the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .adam import AdamMoments, adam_direction
from .geometry import truncation_ranks
from .group_moments import column_maps, pad_core_moments, precondition, rotate_core_moments, transport_factor_moments
from .masks import block_mask, column_mask, fit_columns, shift_matrix
from .orth import complement_basis, complement_gram, eigh_descending, identity, polar_step, positions
from .tucker import batch_fold, batch_mode_dot, batch_unfold

# the core's update; adam_normalized: adam_core_update; adam_factors: factor_direction
CORE_OPTIMIZERS = ("adam", "adam_normalized", "adam_factors", "sgd")
DEFAULT_CORE_OPTIMIZER = "adam_factors"     # the config's, the integrator's and the optimizer's default


@dataclass
class RankBounds:
    """Rank rule of one adapter: relative (or absolute) tolerance ``tau`` and ``r_min <= r <= r_max``."""

    tau: float
    r_min: int
    r_max: int
    absolute: bool = False


@dataclass
class Bounds:
    """Rank rules of a group, one entry per adapter ``(B,)``: tolerance, ``r_min``, ``r_max``, absolute mode, and
    ``cap`` (B, d): the most columns each mode may hold (``min(r_max, R_i)`` of the adapter's own storage; a group
    may be padded past it)."""

    tau: Tensor
    r_min: Tensor
    r_max: Tensor
    absolute: Tensor
    cap: Tensor


@dataclass
class Group:
    """B adapters of one storage shape, stacked, in the compute dtype.

    ``core`` (B, R_1, ..., R_d); ``factors[i]`` (B, n_i, R_i) or None (mode not factorized, ``R_i = n_i``);
    ``ranks`` (B, d) int64; ``moments``: Adam moments shaped like ``core``; ``k_buffer``: the K-gradient moments of
    every factorized mode (B, 4, sum_i n_i, W) with each mode's ``k_layout`` entry (first row, n_i, R_i)
    (``group_moments.py``), or None."""

    core: Tensor
    factors: list[Tensor | None]
    ranks: Tensor
    matrix: bool
    moments: AdamMoments | None = None
    k_buffer: Tensor | None = None
    k_layout: list[tuple[int, int, int] | None] | None = None


@dataclass
class Proposal:
    """Steps 1-2 and the eigenpairs of step 3, before the ranks are agreed on."""

    group: Group                       # the group before the step
    bases: list[Tensor | None]         # Û_i (B, n_i, R_i)
    core: Tensor                       # Ĉ (B, R_1, ..., R_d)
    augmented: Tensor                  # r̂ (B, d)
    eig: list[tuple[Tensor, Tensor] | None]    # (Λ_i (B, R_i) descending, P_i (B, R_i, R_i))
    ranks: Tensor                      # proposed new ranks (B, d)
    moments: AdamMoments | None        # in the augmented coordinates
    qs: list[Tensor | None]            # Q_i of the old core (Tucker; None for a matrix)
    k_buffer: Tensor | None = None     # the K-gradient moments after this step's update (old coordinates)


# ----------------------------------------------------------------------------- pieces of the step
def row_space_bases(core: Tensor, ranks: Tensor, factored: list[bool], matrix: bool) -> list[Tensor | None]:
    """``Q_i`` of ``Mat_i(C)^T = Q_i R_i`` for the factorized modes of a Tucker core (``(B, prod_{j != i} R_j, q)``,
    columns past ``min(r_i, prod_{j != i} r_j)`` zeroed); None for a matrix (``Q = I``) and unfactorized modes.
    The conv adapters' backward uses the same function, so both agree on ``Q_i`` (arbitrary where ``Mat_i(C)`` is
    rank-deficient)."""
    if matrix:
        return [None] * len(factored)
    out: list[Tensor | None] = []
    total = ranks.prod(-1)
    for i, f in enumerate(factored):
        if not f:
            out.append(None)
            continue
        Q = torch.linalg.qr(batch_unfold(core, i).mT)[0]
        width = torch.minimum(ranks[:, i], total // ranks[:, i].clamp_min(1))
        out.append(Q * column_mask(width, Q.shape[-1])[:, None, :].to(Q.dtype))
    return out


def augmented_gradient(core_grad: Tensor, k_grads: list[Tensor | None], new: list[Tensor | None],
                       qs: list[Tensor | None], shifts: list[Tensor | None] | None) -> Tensor:
    """Ĝ of step 2 in the compact coordinates: ``G_C + Σ_i Ten_i(Ũ_i^T G_Ki Q_i^T) x_i Σ_i^T`` (``shifts`` None:
    ``Σ_i = I``)."""
    shape = list(core_grad.shape[1:])
    grad = core_grad
    for i, (G_K, U_new) in enumerate(zip(k_grads, new)):
        if U_new is None:
            continue
        coeff = U_new.mT @ G_K                                              # (B, R_i, columns of G_Ki)
        if qs[i] is not None:
            coeff = coeff[..., : qs[i].shape[-1]] @ qs[i].mT                # (B, R_i, prod_{j != i} R_j)
        else:
            coeff = fit_columns(coeff, shape[1 - i])                        # matrix: the other side's width
        folded = batch_fold(coeff, i, shape)
        grad = grad + (folded if shifts is None else batch_mode_dot(folded, shifts[i].mT, i))
    return grad


# ----------------------------------------------------------------------------- the step
def stack_modes(mats: list[Tensor]) -> Tensor:
    """Per-mode batches ``(B, n_i, R)`` as one ``(M B, max_i n_i, R)``, rows zero-padded (a zero row changes no Gram
    matrix and no projection, so the modes of one width run as one batch)."""
    n = max(m.shape[-2] for m in mats)
    padded = [m if m.shape[-2] == n else torch.nn.functional.pad(m, (0, 0, 0, n - m.shape[-2])) for m in mats]
    return torch.cat(padded) if len(padded) > 1 else padded[0]


def augment(group: Group, k_dirs: list[Tensor | None], caps: Tensor
            ) -> tuple[list[Tensor | None], list[Tensor | None], Tensor]:
    """Step 1: new directions ``Ũ_i`` (B, n_i, R_i, zero past their count) and the shifts ``Σ_i``; returns them
    and the augmented ranks r̂ (B, d), at most ``caps`` (B, d) and the group's width. The modes of one width are
    stacked into one batch; one batched eigh for every factorized mode."""
    ranks = group.ranks
    B = ranks.shape[0]
    eps = torch.finfo(group.core.dtype).eps
    classes: dict[int, list[int]] = {}
    for i, U in enumerate(group.factors):
        if U is not None:
            classes.setdefault(U.shape[-1], []).append(i)
    work = []
    for width, members in classes.items():
        U = stack_modes([group.factors[i] for i in members])                  # (M B, n, R)
        D = stack_modes([k_dirs[i] for i in members])
        # (M B,) mode-major like U (consecutive modes: a view, no gather kernel)
        pick = slice(members[0], members[-1] + 1) if members[-1] - members[0] == len(members) - 1 else members
        r = ranks[:, pick].mT.reshape(-1)
        cap = caps[:, pick].mT.reshape(-1).clamp_max(width)
        work.append((width, cap, members, U, r, *complement_gram(U, D, eps)))
    eig = iter(eigh_descending([w[6] for w in work]))
    new: list[Tensor | None] = [None] * len(group.factors)
    shifts: list[Tensor | None] = [None] * len(group.factors)
    counts: list[Tensor | None] = [None] * len(group.factors)
    for width, cap, members, U, r, Z, _, threshold in work:
        values, vectors = next(eig)
        max_new = torch.minimum(r, cap - r)                                  # at most r new columns, within storage
        U_new, count = complement_basis(U, Z, values, vectors, threshold, max_new)
        shift = shift_matrix(r, width, U.dtype)
        for j, i in enumerate(members):
            batch = slice(j * B, (j + 1) * B)
            new[i] = U_new[batch, : group.factors[i].shape[-2]]
            shifts[i] = shift[batch]
            counts[i] = count[batch]
    if list(classes.values()) == [list(range(len(group.factors)))]:      # one class of every mode, in order
        return new, shifts, ranks + count.view(len(group.factors), B).mT
    zero = torch.zeros_like(ranks[:, 0])                                  # modes that are not factorized
    return new, shifts, ranks + torch.stack([zero if c is None else c for c in counts], -1)


def propose(group: Group, core_grad: Tensor, k_grads: list[Tensor | None], lr: float | Tensor, bounds: Bounds,
            adam: dict | None = None, k_grad_rows: Tensor | None = None) -> Proposal:
    """Steps 1-2 and the eigenpairs of step 3; ``adam`` (betas, eps, weight_decay) selects the Adam core update.
    ``k_grad_rows``: the K-gradients already stacked by rows like ``group.k_buffer`` (saves a copy)."""
    factored = [U is not None for U in group.factors]
    shape = list(group.core.shape[1:])
    qs = row_space_bases(group.core, group.ranks, factored, group.matrix)
    k_dirs, k_buffer = precondition(group.k_buffer, group.k_layout, k_grads, adam, k_grad_rows)
    new, shifts, augmented = augment(group, k_dirs, bounds.cap)
    grad_hat = augmented_gradient(core_grad, k_grads, new, qs, shifts)
    moments = None
    if adam is None or group.moments is None:
        core_hat = group.core - lr * grad_hat
    else:
        old = block_mask(group.ranks, shape)
        direction, moments = adam_direction(grad_hat, pad_core_moments(group.moments, old), adam["betas"],
                                            adam["eps"])
        if k_buffer is not None:
            # the new blocks from the preconditioned K-gradients (adam.py); the old block from the core's Adam, or
            # with adam["factors"] from the same K-directions (factor_direction)
            if adam.get("factors"):
                direction = factor_direction(group, k_dirs, qs)
            direction = augmented_gradient(direction * old, k_dirs, new, qs, shifts)
        core_hat = adam_core_update(group.core, direction, augmented, lr, adam)
    bases = [None if U is None else torch.baddbmm(U, N, S) for U, N, S in zip(group.factors, new, shifts)]
    return truncation_proposal(group, bases, core_hat, augmented, bounds, moments, qs, k_buffer)


def factor_direction(group: Group, k_dirs: list[Tensor | None], qs: list[Tensor | None]) -> Tensor:
    """The old block's Adam direction from the factors: ``Σ_i Ten_i(U_i^T D_Ki Q_i^T)`` for the Adam directions
    ``D_Ki`` of the K-gradients, the move of the core that the factor steps ``K_i <- K_i - lr D_Ki`` make in the
    current basis. With the new blocks (``augmented_gradient``), the weight then moves by
    ``-lr Σ_i Ten_i(D_Ki Q_i^T (kron_{j != i} U_j)^T)`` before the truncation: a matrix by ``-lr (D_K V^T + U D_L^T)``,
    LoRA's ``ΔB A + B ΔA`` in orthonormal coordinates, where the core's own Adam moves each core entry by about lr."""
    return augmented_gradient(torch.zeros_like(group.core), k_dirs, group.factors, qs, None)


def adam_core_update(core: Tensor, direction: Tensor, ranks: Tensor, lr: float | Tensor, adam: dict) -> Tensor:
    """``Ĉ = C - lr (D / n + wd C)`` for the Adam direction D (B, R_1, ..., R_d) at ranks r̂ (B, d):
    ``n = sqrt(prod_i r̂_i)`` with ``adam["normalize"]``, else 1. Adam's entries are about ±1, so ``||D||_F`` grows
    like ``sqrt(prod_i r̂_i)``: normalized, the step's size is about ``lr`` whatever the rank."""
    if adam.get("normalize"):
        n = ranks.prod(-1).clamp_min(1).to(direction.dtype).sqrt()
        direction = direction / n.reshape(-1, *[1] * (direction.dim() - 1))
    decay = adam.get("weight_decay", 0.0)
    return core - lr * (direction + decay * core if decay else direction)


def padded_grams(mats: list[Tensor], counts: Tensor) -> Tensor:
    """``M_i M_i^T`` of every mode stacked (B, d, W, W) with ``-1`` on the diagonal past ``counts[:, i]``: those
    positions get negative eigenvalues, never chosen."""
    grams = torch.stack([M @ M.mT for M in mats], 1)
    past = positions(grams.shape[-1], counts.device) >= counts[..., None]                  # (B, d, W)
    grams.diagonal(dim1=-2, dim2=-1).sub_(past.to(grams.dtype))
    return grams


def truncation_proposal(group: Group, bases: list[Tensor | None], core_hat: Tensor, augmented: Tensor,
                        bounds: Bounds, moments: AdamMoments | None, qs: list[Tensor | None],
                        k_buffer: Tensor | None = None) -> Proposal:
    """The eigenvectors ``P_i`` of ``Mat_i(Ĉ) Mat_i(Ĉ)^T`` (one batched call; positions past r̂_i get eigenvalue
    -1, never chosen), the squared singular values ``||P_i^T Mat_i(Ĉ)||^2`` per column and the tau-rule ranks,
    capped by ``min(r_max, R_i, r̂_i, prod_{j != i} r̂_j)`` (shared by BUG)."""
    if group.matrix:
        # U S V^T: Mat_1(Ĉ) = Ĉ, Mat_2(Ĉ) = Ĉ^T (no unfolding copies), one eigh for both sides; both sides have the
        # same singular values, so one truncated rank, capped by both sides
        if core_hat.shape[-1] == core_hat.shape[-2]:
            (_, vectors), = eigh_descending([padded_grams([core_hat, core_hat.mT], augmented).flatten(0, 1)])
            left, right = vectors.unflatten(0, (-1, 2)).unbind(1)                          # (B, W, W) each
        else:
            (_, left), (_, right) = eigh_descending([padded_grams([M], augmented[:, i:i + 1])[:, 0]
                                                     for i, M in enumerate((core_hat, core_hat.mT))])
        values = (left.mT @ core_hat).square().sum(-1)
        cap = torch.minimum(torch.minimum(bounds.r_max, bounds.cap.amin(-1)).clamp_max(min(U.shape[-1] for U in bases)),
                            augmented.amin(-1))
        k = truncation_ranks(values, bounds.tau, bounds.r_min, cap, bounds.absolute, group.ranks[:, 0])
        return Proposal(group=group, bases=bases, core=core_hat, augmented=augmented,
                        eig=[(values, left), (values, right)], ranks=k[:, None].expand(-1, 2), moments=moments,
                        qs=qs, k_buffer=k_buffer)
    unfolded = [None if U is None else batch_unfold(core_hat, i) for i, U in enumerate(bases)]
    grams = [padded_grams([M], augmented[:, i:i + 1])[:, 0] for i, M in enumerate(unfolded) if M is not None]
    eig = iter(eigh_descending(grams))
    total = augmented.prod(-1)
    pairs: list[tuple[Tensor, Tensor] | None] = []
    ranks = augmented.clone()
    for i, U in enumerate(bases):
        if U is None:
            pairs.append(None)
            continue
        _, vectors = next(eig)
        cap = torch.minimum(torch.minimum(torch.minimum(bounds.r_max, bounds.cap[:, i]).clamp_max(U.shape[-1]),
                                          augmented[:, i]), total // augmented[:, i].clamp_min(1))
        # σ_j^2 = ||p_j^T Mat_i(Ĉ)||^2: accurate to eps σ_1 (the Gram's eigenvalues only to sqrt(eps) σ_1)
        values = (vectors.mT @ unfolded[i]).square().sum(-1)
        ranks[:, i] = truncation_ranks(values, bounds.tau, bounds.r_min, cap, bounds.absolute, group.ranks[:, i])
        pairs.append((values, vectors))
    return Proposal(group=group, bases=bases, core=core_hat, augmented=augmented, eig=pairs, ranks=ranks,
                    moments=moments, qs=qs, k_buffer=k_buffer)


def truncations(proposal: Proposal, ranks: Tensor) -> list[Tensor | None]:
    """``P_ik`` (B, R_i, R_i) per factorized mode: the eigenvectors, zero past the new rank; ``P = I`` where Ĉ = 0
    (a zero core keeps the leading columns of the current basis). A matrix's two sides in one pass."""
    if proposal.group.matrix:
        values, P = proposal.eig[0][0], proposal.eig[0][1]
        if P.shape == proposal.eig[1][1].shape:
            P = torch.stack([P, proposal.eig[1][1]], 1)                                      # (B, 2, W, W)
            P = torch.where((values[:, :1] <= 0)[:, :, None, None], identity(P.shape[-1], P), P)
            return list((P * column_mask(ranks, P.shape[-1])[:, :, None, :]).unbind(1))
    out: list[Tensor | None] = []
    for i, pair in enumerate(proposal.eig):
        if pair is None:
            out.append(None)
            continue
        values, P = pair
        P = torch.where((values[:, :1] <= 0)[:, :, None], identity(P.shape[-1], P), P)
        out.append(P * column_mask(ranks[:, i], P.shape[-1])[:, None, :])
    return out


def apply(proposal: Proposal, ranks: Tensor) -> Group:
    """Step 3 with the agreed ``ranks`` (B, d): rotate core, bases and moments; zero past the new ranks."""
    group = proposal.group
    rotations = truncations(proposal, ranks)
    core = proposal.core
    for i, P in enumerate(rotations):
        if P is not None:
            core = batch_mode_dot(core, P.mT, i)
    factors = [None if P is None else U @ P for U, P in zip(proposal.bases, rotations)]
    moments = None if proposal.moments is None else rotate_core_moments(proposal.moments, rotations)
    k_buffer = None
    if proposal.k_buffer is not None:
        qs_new = row_space_bases(core, ranks, [P is not None for P in rotations], group.matrix)
        maps = column_maps(group.ranks, ranks, rotations, group.matrix, proposal.qs, qs_new,
                           list(core.shape[1:]), proposal.k_buffer.shape[-1])
        k_buffer = transport_factor_moments(proposal.k_buffer, group.k_layout, maps)
    # one Newton-Schulz step per basis: float32 round-off never accumulates (W changes to second order only)
    for i, U in enumerate(factors):
        if U is not None:
            factors[i], M = polar_step(U)
            core = batch_mode_dot(core, M, i)
    return Group(core=core, factors=factors, ranks=ranks, matrix=group.matrix, moments=moments, k_buffer=k_buffer,
                 k_layout=group.k_layout)


def step(group: Group, core_grad: Tensor, k_grads: list[Tensor | None], lr: float | Tensor, bounds: Bounds,
         adam: dict | None = None) -> Group:
    """The whole parallel step for one group (no rank agreement): ``apply(propose(...), proposal.ranks)``."""
    proposal = propose(group, core_grad, k_grads, lr, bounds, adam)
    return apply(proposal, proposal.ranks)


def num_parameters(sizes: list[int], ranks: Tensor, factored: list[bool]) -> Tensor:
    """Active parameters per adapter ``sum_i n_i r_i + prod_i r_i`` over factorized modes (B,)."""
    count = ranks.prod(-1)
    for i, (n, f) in enumerate(zip(sizes, factored)):
        if f:
            count = count + n * ranks[:, i]
    return count

