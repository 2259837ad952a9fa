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

from .adam import AdamMoments, adam_direction, transport_columns
from .geometry import truncation_ranks
from .orth import complement_basis, complement_gram, eigh_descending, identity, polar_step, positions
from .tucker import batch_fold, batch_mode_dot, batch_unfold


@dataclass
class RankBounds:
    """Rank rule of one adapter: relative (or absolute) tolerance ``tau`` and ``r_min <= r <= r_max``."""

    tau: float
    r_min: int
    r_max: int
    absolute: bool = False


@dataclass
class Bounds:
    """Rank rules of a group, one entry per adapter ``(B,)``: tolerance, ``r_min``, ``r_max``, absolute mode."""

    tau: Tensor
    r_min: Tensor
    r_max: Tensor
    absolute: Tensor


@dataclass
class Group:
    """B adapters of one storage shape, stacked, in the compute dtype.

    ``core`` (B, R_1, ..., R_d); ``factors[i]`` (B, n_i, R_i) or None (mode not factorized, ``R_i = n_i``);
    ``ranks`` (B, d) int64; ``moments``: Adam moments shaped like ``core``, with the K-gradient moments in
    ``moments.factors[i]`` (m, v: (B, n_i, R_i); wm, wv: (B, 1, R_i), equal in every row) or None."""

    core: Tensor
    factors: list[Tensor | None]
    ranks: Tensor
    matrix: bool
    moments: AdamMoments | None = None
    # the K-gradient moments of all modes in one tensor each (B, sum_i n_i, W), factorized modes by rows, and each
    # mode's (first row, n_i, R_i): ``moments.factors`` are views of it (factor_views)
    k_moments: AdamMoments | None = None
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
    moments: AdamMoments | None        # in the augmented coordinates (+ updated K-gradient moments)
    qs: list[Tensor | None]            # Q_i of the old core (Tucker; None for a matrix)


# ----------------------------------------------------------------------------- masks
def column_mask(count: Tensor, width: int) -> Tensor:
    """``(B, width)`` bool: column j < count[b]."""
    return positions(width, count.device)[None, :] < count[:, None]


def block_mask(ranks: Tensor, shape: list[int]) -> Tensor:
    """``(B, *shape)`` bool: the leading ``ranks[b]`` block of every mode."""
    mask = None
    for i, n in enumerate(shape):
        m = column_mask(ranks[:, i], n).reshape(-1, *[n if j == i else 1 for j in range(len(shape))])
        mask = m if mask is None else mask & m
    return mask


def shift_matrix(offset: Tensor, width: int, dtype: torch.dtype) -> Tensor:
    """``Σ`` (B, width, width) with ``Σ[b, j, offset_b + j] = 1``: ``Ũ Σ`` moves column j to position offset + j."""
    j = positions(width, offset.device)
    return (j[None, None, :] == (j[None, :, None] + offset[:, None, None])).to(dtype)


def fit_columns(X: Tensor, width: int) -> Tensor:
    """Slice or zero-pad the last dimension to ``width``."""
    extra = width - X.shape[-1]
    return X[..., :width] if extra <= 0 else torch.nn.functional.pad(X, (0, extra))


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
                       qs: list[Tensor | None], shifts: list[Tensor | None]) -> Tensor:
    """Ĝ of step 2 in the compact coordinates: ``G_C + Σ_i Ten_i(Ũ_i^T G_Ki Q_i^T) x_i Σ_i^T``."""
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
        grad = grad + batch_mode_dot(batch_fold(coeff, i, shape), shifts[i].mT, i)
    return grad


def masked_mean(t: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``t`` over ``mask`` per batch entry, shaped to broadcast against ``t``; 0 where the mask is empty."""
    dims = tuple(range(1, t.dim()))
    total = (t * mask).sum(dims, keepdim=True)
    return total / mask.sum(dims, keepdim=True).clamp_min(1)


# ----------------------------------------------------------------------------- the step
def factor_views(state: AdamMoments, layout: list[tuple[int, int, int] | None]) -> list[AdamMoments | None]:
    """Per-mode views ``(B, n_i, R_i)`` of K-gradient moments stacked by rows (the weights as one row)."""
    out: list[AdamMoments | None] = []
    for entry in layout:
        if entry is None:
            out.append(None)
            continue
        start, n, width = entry
        rows = slice(start, start + n)
        out.append(AdamMoments(state.m[:, rows, :width], state.v[:, rows, :width], state.wm[:, start:start + 1, :width],
                               state.wv[:, start:start + 1, :width]))
    return out


def precondition(group: Group, k_grads: list[Tensor | None], adam: dict | None
                 ) -> tuple[list[Tensor | None], list[AdamMoments | None] | None]:
    """Adam directions of the K-gradients (entry-wise, every mode in one call on the row-stacked moments) and their
    new per-mode moments; the gradients themselves for SGD."""
    if adam is None or group.k_moments is None:
        return list(k_grads), None
    width = group.k_moments.m.shape[-1]
    stacked = torch.cat([fit_columns(G, width) for G in k_grads if G is not None], 1)      # (B, sum_i n_i, W)
    direction, state = adam_direction(stacked, group.k_moments, adam["betas"], adam["eps"])
    dirs = [None if v is None else v.m for v in factor_views(AdamMoments(direction, direction, direction, direction),
                                                              group.k_layout)]
    return dirs, factor_views(state, group.k_layout)


def stack_modes(mats: list[Tensor]) -> Tensor:
    """Per-mode batches ``(B, n_i, R)`` as one ``(M B, max_i n_i, R)``, rows zero-padded (a zero row changes no Gram
    matrix and no projection, so the modes of one width run as one batch)."""
    n = max(m.shape[-2] for m in mats)
    padded = [m if m.shape[-2] == n else torch.nn.functional.pad(m, (0, 0, 0, n - m.shape[-2])) for m in mats]
    return torch.cat(padded) if len(padded) > 1 else padded[0]


def augment(group: Group, k_dirs: list[Tensor | None], caps: list[int] | None = None
            ) -> tuple[list[Tensor | None], list[Tensor | None], Tensor]:
    """Step 1: new directions ``Ũ_i`` (B, n_i, R_i, zero past their count) and the shifts ``Σ_i``; returns them
    and the augmented ranks r̂ (B, d), at most ``caps[i]`` (default: the storage width). The modes of one width are
    stacked into one batch; one batched eigh for every factorized mode."""
    ranks = group.ranks
    B = ranks.shape[0]
    eps = torch.finfo(group.core.dtype).eps
    classes: dict[tuple[int, int], list[int]] = {}
    for i, U in enumerate(group.factors):
        if U is not None:
            classes.setdefault((U.shape[-1], U.shape[-1] if caps is None else min(caps[i], U.shape[-1])),
                               []).append(i)
    work = []
    for (width, cap), members in classes.items():
        U = stack_modes([group.factors[i] for i in members])                  # (M B, n, R)
        D = stack_modes([k_dirs[i] for i in members])
        r = torch.cat([ranks[:, i] for i in members]) if len(members) > 1 else ranks[:, members[0]]
        work.append((width, cap, members, U, r, *complement_gram(U, D, eps)))
    eig = iter(eigh_descending([w[6] for w in work]))
    new: list[Tensor | None] = [None] * len(group.factors)
    shifts: list[Tensor | None] = [None] * len(group.factors)
    counts = [torch.zeros_like(ranks[:, 0])] * len(group.factors)
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
    return new, shifts, ranks + torch.stack(counts, -1)


def pad_core_moments(moments: AdamMoments, old: Tensor) -> AdamMoments:
    """Moments in the augmented coordinates: entries outside the old block get ``m = wm = 0`` and the mean ``v``,
    ``wv`` of the old block (``adam.py``)."""
    mask = old.to(moments.v.dtype)
    return AdamMoments(moments.m, torch.where(old, moments.v, masked_mean(moments.v, mask)), moments.wm,
                       torch.where(old, moments.wv, masked_mean(moments.wv, mask)), moments.factors)


def propose(group: Group, core_grad: Tensor, k_grads: list[Tensor | None], lr: float | Tensor, bounds: Bounds,
            adam: dict | None = None) -> Proposal:
    """Steps 1-2 and the eigenpairs of step 3; ``adam`` (betas, eps, weight_decay) selects the Adam core update."""
    factored = [U is not None for U in group.factors]
    shape = list(group.core.shape[1:])
    qs = row_space_bases(group.core, group.ranks, factored, group.matrix)
    k_dirs, factor_moments = precondition(group, k_grads, adam)
    new, shifts, augmented = augment(group, k_dirs)
    grad_hat = augmented_gradient(core_grad, k_grads, new, qs, shifts)
    old = block_mask(group.ranks, shape)
    moments = None
    if adam is None or group.moments is None:
        core_hat = group.core - lr * grad_hat
    else:
        direction, moments = adam_direction(grad_hat, pad_core_moments(group.moments, old), adam["betas"],
                                            adam["eps"])
        if factor_moments is not None:
            # the new blocks from the preconditioned K-gradients (adam.py), the old block from the core's Adam
            direction = augmented_gradient(direction * old, k_dirs, new, qs, shifts)
            moments.factors = factor_moments
        decay = adam.get("weight_decay", 0.0)
        core_hat = group.core - lr * (direction + decay * group.core if decay else direction)
    bases = [None if U is None else torch.baddbmm(U, N, S) for U, N, S in zip(group.factors, new, shifts)]
    return truncation_proposal(group, bases, core_hat, augmented, bounds, moments, qs)


def truncation_proposal(group: Group, bases: list[Tensor | None], core_hat: Tensor, augmented: Tensor,
                        bounds: Bounds, moments: AdamMoments | None, qs: list[Tensor | None]) -> Proposal:
    """The eigenvectors ``P_i`` of ``Mat_i(Ĉ) Mat_i(Ĉ)^T`` (one batched call; positions past r̂_i get eigenvalue
    -1, never chosen), the squared singular values ``||P_i^T Mat_i(Ĉ)||^2`` per column and the tau-rule ranks,
    capped by ``min(r_max, R_i, r̂_i, prod_{j != i} r̂_j)`` (shared by BUG)."""
    if group.matrix:                          # Mat_1(Ĉ) = Ĉ, Mat_2(Ĉ) = Ĉ^T: no unfolding copies
        unfolded = [core_hat, core_hat.mT]
    else:
        unfolded = [None if U is None else batch_unfold(core_hat, i) for i, U in enumerate(bases)]
    grams = [M @ M.mT - torch.diag_embed((~column_mask(augmented[:, i], M.shape[1])).to(M.dtype))
             for i, M in enumerate(unfolded) if M is not None]
    eig = iter(eigh_descending(grams))
    if group.matrix:
        # U S V^T: both sides have the same singular values; one truncated rank, capped by both sides
        (_, left), (_, right) = next(eig), next(eig)
        values = (left.mT @ core_hat).square().sum(-1)
        cap = torch.minimum(bounds.r_max.clamp_max(min(U.shape[-1] for U in bases)), augmented.amin(-1))
        k = truncation_ranks(values, bounds.tau, bounds.r_min, cap, bounds.absolute)
        return Proposal(group=group, bases=bases, core=core_hat, augmented=augmented,
                        eig=[(values, left), (values, right)], ranks=k[:, None].expand(-1, 2), moments=moments,
                        qs=qs)
    total = augmented.prod(-1)
    pairs: list[tuple[Tensor, Tensor] | None] = []
    ranks = augmented.clone()
    for i, U in enumerate(bases):
        if U is None:
            pairs.append(None)
            continue
        _, vectors = next(eig)
        cap = torch.minimum(torch.minimum(bounds.r_max.clamp_max(U.shape[-1]), augmented[:, i]),
                            total // augmented[:, i].clamp_min(1))
        # σ_j^2 = ||p_j^T Mat_i(Ĉ)||^2: accurate to eps σ_1 (the Gram's eigenvalues only to sqrt(eps) σ_1)
        values = (vectors.mT @ unfolded[i]).square().sum(-1)
        ranks[:, i] = truncation_ranks(values, bounds.tau, bounds.r_min, cap, bounds.absolute)
        pairs.append((values, vectors))
    return Proposal(group=group, bases=bases, core=core_hat, augmented=augmented, eig=pairs, ranks=ranks,
                    moments=moments, qs=qs)


def apply(proposal: Proposal, ranks: Tensor) -> Group:
    """Step 3 with the agreed ``ranks`` (B, d): rotate core, bases and moments; zero past the new ranks."""
    core = proposal.core
    factors: list[Tensor | None] = []
    rotations: list[Tensor | None] = []
    for i, (U_hat, pair) in enumerate(zip(proposal.bases, proposal.eig)):
        if U_hat is None:
            factors.append(None)
            rotations.append(None)
            continue
        values, P = pair
        # zero core: keep the leading columns of the current basis (P = I)
        P = torch.where((values[:, :1] <= 0)[:, :, None], identity(P.shape[-1], P), P)
        P_k = torch.where(column_mask(ranks[:, i], P.shape[-1])[:, None, :], P, 0.0)      # (B, R_i, R_i)
        core = batch_mode_dot(core, P_k.mT, i)
        factors.append(U_hat @ P_k)
        rotations.append(P_k)
    moments = None
    if proposal.moments is not None:
        moments = rotate_core_moments(proposal.moments, rotations)
        if proposal.moments.factors is not None:
            moments.factors = transport_factor_moments(proposal, rotations, core, ranks)
    # one Newton-Schulz step per basis: float32 round-off never accumulates (W changes to second order only)
    for i, U in enumerate(factors):
        if U is not None:
            factors[i], M = polar_step(U)
            core = batch_mode_dot(core, M, i)
    return Group(core=core, factors=factors, ranks=ranks, matrix=proposal.group.matrix, moments=moments)


def rotate_core_moments(state: AdamMoments, rotations: list[Tensor | None]) -> AdamMoments:
    """``m x_i P_i^T`` and ``(v, wm, wv) x_i (P_i * P_i)^T`` (``adam.py``)."""
    m, v, wm, wv = state.tensors()
    for i, P in enumerate(rotations):
        if P is not None:
            m = batch_mode_dot(m, P.mT, i)
            P2 = (P * P).mT
            v, wm, wv = (batch_mode_dot(t, P2, i) for t in (v, wm, wv))
    return AdamMoments(m, v, wm, wv)


def transport_factor_moments(proposal: Proposal, rotations: list[Tensor | None], core: Tensor, ranks: Tensor
                             ) -> list[AdamMoments | None]:
    """The K-gradient moments in the new column coordinates: ``m <- m T``, ``(v, wm, wv) <- (.)(T * T)`` with
    ``T = Q_old^T E^T (kron_{j != i} P_j) Q_new`` (matrix: ``T = E^T P_other``), zero past the new width."""
    group = proposal.group
    shape = list(core.shape[1:])
    old = [None if P is None else column_mask(group.ranks[:, i], P.shape[-2]) for i, P in enumerate(rotations)]
    new_qs = row_space_bases(core, ranks, [P is not None for P in rotations], group.matrix)
    out: list[AdamMoments | None] = []
    for i, state in enumerate(proposal.moments.factors):
        if state is None:
            out.append(None)
            continue
        width = state.m.shape[-1]
        k_old = group.ranks[:, 1 - i] if group.matrix else torch.minimum(
            group.ranks[:, i], group.ranks.prod(-1) // group.ranks[:, i].clamp_min(1))
        if group.matrix:
            other = 1 - i
            T = rotations[other] * old[other][:, :, None].to(core.dtype)    # (B, R_other, R_other)
            T = fit_columns(fit_columns(T, width).mT, width).mT             # to this K-gradient's width
            new_width = ranks[:, other]
        else:
            T = column_transport(proposal.qs[i], new_qs[i], rotations, old, i, shape)
            T = fit_columns(fit_columns(T, width).mT, width).mT
            new_width = torch.minimum(ranks[:, i], ranks.prod(-1) // ranks[:, i].clamp_min(1))
        moved = transport_columns(state, T, column_mask(k_old, width)[:, None, :])
        keep = column_mask(new_width, width)[:, None, :].to(core.dtype)
        out.append(AdamMoments(*(t * keep for t in moved.tensors())))
    return out


def column_transport(q_old: Tensor, q_new: Tensor, rotations: list[Tensor | None], old: list[Tensor | None],
                     mode: int, shape: list[int]) -> Tensor:
    """``T = Q_old^T E^T (kron_{j != i} P_j) Q_new`` (B, q_old, q_new) of a Tucker mode: each column of ``Q_new``
    folded to a core slice, taken back to the augmented coordinates by the other modes' ``P_j``, restricted to the
    old block (``E^T``) and expressed in ``Q_old``'s columns."""
    folded = list(shape)
    folded[mode] = q_new.shape[-1]
    X = batch_fold(q_new.mT, mode, folded)                                  # (B, ..., q_new, ...)
    for j, P in enumerate(rotations):
        if j != mode and P is not None:
            X = batch_mode_dot(X, P, j) * old[j].reshape(-1, *[n if l == j else 1 for l, n in enumerate(folded)]
                                                         ).to(X.dtype)
    return (batch_unfold(X, mode) @ q_old).mT


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

