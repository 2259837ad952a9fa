"""The rank-adaptive step of ``step.py`` for many adapters at once: one batched QR/SVD per group, not per adapter.

Adapters whose storages have the same shapes, active ranks, dtype and device form a group (the 72 linears of a
DeBERTa-base are three groups: 768x768, 3072x768 and 768x3072). A group's active tensors are stacked along a
leading batch dimension ``B`` and every matmul, QR and SVD of ``step.propose``/``step.apply`` runs once per group
(``torch.linalg`` batches them). The step is the same, formula by formula:

    augment   Z_b = (I - U_b U_b^T) G_Kb (projected twice),  Ũ_b = orth((I - U_b U_b^T) left_b[:, :k])
    core      Ĉ_b = pad(C_b) - lr * Ĝ_b   (or Adam on Ĝ_b)
    truncate  Mat_i(Ĉ_b) = P_b Σ_b ...,  C_b <- Ĉ_b x_i (P_b M_b)^T,  U_b <- Û_b (P_b M_b)

where ``M_b`` masks the columns past adapter b's new rank ``k_b``: adapters of a group may truncate to different
ranks, and the masked columns give exact zeros, i.e. the storage's zero padding past the rank.

Host synchronisations per step: one for the rank decision (the singular values and the number of new directions
of every adapter, all groups together) and one for the orthonormality check (plus the integrator's check for
non-finite gradients); none per adapter. The agreed ranks go back to the device in one asynchronous copy.

An adapter whose projected gradient has fewer independent directions than the augmentation may add (a
rank-deficient ``G_K``, rare; known only at the rank-decision sync) is recomputed by the per-adapter path
(``fallback``), so every adapter gets the per-adapter result (``tests/test_batched_step.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..layers.storage import LowRankStorage, active_factor_moments
from .adam import AdamMoments, adam_direction, transport_columns
from .geometry import DROP_FACTOR, compute_dtype, eps, orthonormality_tolerance, orthonormalize, truncation_rank
from .step import Proposal, apply, column_transport, precondition_k_grads, unfolding_bases
from .tucker import mode_dot


# ----------------------------------------------------------------------------- batched Tucker algebra
def batch_unfold(tensor: Tensor, mode: int) -> Tensor:
    """``Mat_i`` of every tensor of a batch: ``(B, n_1, ..., n_d) -> (B, n_i, prod_{j != i} n_j)``."""
    return torch.movedim(tensor, mode + 1, 1).reshape(tensor.shape[0], tensor.shape[mode + 1], -1)


def batch_fold(matrix: Tensor, mode: int, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`batch_unfold`; ``shape`` is one tensor's shape ``(n_1, ..., n_d)``."""
    moved = [shape[mode], *[s for j, s in enumerate(shape) if j != mode]]
    return torch.movedim(matrix.reshape(matrix.shape[0], *moved), 1, mode + 1)


def batch_mode_dot(tensor: Tensor, matrix: Tensor, mode: int) -> Tensor:
    """``T_b x_i M_b`` for every b: ``tensor`` (B, n_1, ..., n_d), ``matrix`` (B, m, n_i)."""
    shape = list(tensor.shape[1:])
    shape[mode] = matrix.shape[1]
    return batch_fold(matrix @ batch_unfold(tensor, mode), mode, shape)


def batch_pad(tensor: Tensor, shape: Sequence[int], fill: Tensor | float = 0.0) -> Tensor:
    """Pad every tensor of the batch at the end of each mode to ``shape`` with ``fill`` (scalar or ``(B,)``)."""
    out = tensor.new_zeros([tensor.shape[0], *shape])
    if isinstance(fill, Tensor):
        out += fill.reshape(-1, *[1] * len(shape))
    elif fill != 0.0:
        out += fill
    out[(slice(None), *[slice(0, s) for s in tensor.shape[1:]])] = tensor
    return out


# ----------------------------------------------------------------------------- the step's pieces, batched
def batch_augment(U: Tensor, G: Tensor, max_new: int) -> tuple[Tensor, Tensor | None]:
    """``augment_basis`` for a batch, assuming every adapter has ``target`` new directions.

    ``U`` (B, n, r), ``G`` (B, n, m). Returns ``Ũ`` (B, n, target) and the number of directions each adapter's
    projected gradient really has, ``(B,)`` on the device (``None`` when nothing is added); an adapter with fewer
    than ``target = Ũ.shape[-1]`` needs the per-adapter path.
    """
    n, r = U.shape[1], U.shape[2]
    max_new = min(max_new, n - r)
    if max_new <= 0:
        return U.new_zeros(U.shape[0], n, 0), None
    # Z = (I - UU^T) G, projected twice for float32 stability
    Z = G - U @ (U.mT @ G)
    Z = Z - U @ (U.mT @ Z)
    left, sigma, _ = torch.linalg.svd(Z, full_matrices=False)
    threshold = DROP_FACTOR * eps(G.dtype) * torch.linalg.matrix_norm(G)          # (B,)
    found = (sigma > threshold[:, None]).sum(-1)                                   # (B,)
    new = left[..., : min(max_new, left.shape[-1])]
    new = new - U @ (U.mT @ new)
    new, _ = torch.linalg.qr(new)
    return new, found


def batch_augmented_gradient(core_grad: Tensor, k_grads: Sequence[Tensor | None], new_bases: Sequence[Tensor | None],
                             qs: Sequence[Tensor | None]) -> Tensor:
    """``step.augmented_gradient`` for a batch (every tensor with a leading batch dimension)."""
    ranks = list(core_grad.shape[1:])
    news = [0 if b is None else b.shape[-1] for b in new_bases]
    grad = core_grad.new_zeros([core_grad.shape[0], *[r + k for r, k in zip(ranks, news)]])
    grad[(slice(None), *[slice(0, r) for r in ranks])] = core_grad
    for i, (G_K, new) in enumerate(zip(k_grads, new_bases)):
        if new is None or new.shape[-1] == 0:
            continue
        coeff = new.mT @ G_K                                   # (B, k_i, m_i)
        if qs[i] is not None:
            coeff = coeff @ qs[i].mT                           # (B, k_i, prod_{j != i} r_j)
        shape = list(ranks)
        shape[i] = new.shape[-1]
        index = [slice(None), *[slice(0, r) for r in ranks]]
        index[i + 1] = slice(ranks[i], ranks[i] + new.shape[-1])
        grad[tuple(index)] = batch_fold(coeff, i, shape)
    return grad


def batch_pad_moments(state: AdamMoments, shape: Sequence[int]) -> AdamMoments:
    """``adam.pad_moments`` for a batch: new entries get ``m = wm = 0`` and each adapter's mean ``v``, ``wv``."""
    dims = tuple(range(1, state.v.dim()))
    return AdamMoments(batch_pad(state.m, shape), batch_pad(state.v, shape, state.v.mean(dim=dims)),
                       batch_pad(state.wm, shape), batch_pad(state.wv, shape, state.wv.mean(dim=dims)))


def batch_rotate_moments(state: AdamMoments, rotations: Sequence[Tensor | None]) -> AdamMoments:
    """``adam.rotate_moments`` for a batch: ``m x_i P_i^T`` and ``(v, wm, wv) x_i (P_i * P_i)^T``."""
    m, v, wm, wv = state.tensors()
    for i, P in enumerate(rotations):
        if P is None:
            continue
        m = batch_mode_dot(m, P.mT, i)
        P2 = (P * P).mT
        v, wm, wv = (batch_mode_dot(t, P2, i) for t in (v, wm, wv))
    return AdamMoments(m, v, wm, wv)


def batch_orthogonality_error(U: Tensor, widths: Tensor) -> Tensor:
    """``max |U_b^T U_b - I_{k_b}|`` of the leading ``k_b = widths[b]`` columns (the others are zero), ``(B,)``."""
    columns = torch.arange(U.shape[-1], device=U.device)
    eye = torch.diag_embed((columns[None, :] < widths[:, None]).to(U.dtype))   # (B, m, m)
    return (U.mT @ U - eye).abs().amax(dim=(-2, -1))


# ----------------------------------------------------------------------------- a group of same-shaped adapters
def group_key(s: LowRankStorage) -> tuple:
    """Adapters with equal keys are stepped together."""
    return (tuple(s.core.shape), tuple(None if U is None else tuple(U.shape) for U in s.factors), tuple(s.ranks),
            s.matrix, s.core.dtype, s.core.device, s.moments is not None)


@dataclass
class GroupProposal:
    """``step.Proposal`` of a group, every tensor with a leading batch dimension B."""

    storages: list[LowRankStorage]
    bases: list[Tensor | None]                    # Û_i (B, n_i, r̂_i)
    core: Tensor                                  # Ĉ (B, r̂_1, ..., r̂_d)
    svds: list[tuple[Tensor, Tensor] | None]      # P_i (B, r̂_i, m_i), sigma_i (B, m_i)
    found: list[Tensor | None]                    # directions the projected gradient has, (B,) per mode
    moments: AdamMoments | None                   # (+ K-gradient moments (B, n_i, m_i) in .factors)
    qs: list[Tensor | None]                       # Q_i of the old cores (B, prod_{j != i} r_j, m_i)


def propose_group(storages: list[LowRankStorage], lr: float, adam: dict | None) -> GroupProposal:
    """Steps 1-2 and the SVDs of step 3 for adapters with the same :func:`group_key` (``adam``: None = SGD)."""
    first = storages[0]
    dtype = compute_dtype(first.core.dtype)
    ranks = list(first.ranks)
    index = tuple(slice(0, r) for r in ranks)

    def stacked(tensors: list[Tensor]) -> Tensor:
        return torch.stack(tensors).to(dtype)

    core = stacked([s.core[index] for s in storages])                       # (B, r_1, ..., r_d)
    core_grad = stacked([s.core.grad[index] for s in storages])
    factors = [None if U is None else stacked([s.factors[i][:, :r] for s in storages])   # (B, n_i, r_i)
               for i, (U, r) in enumerate(zip(first.factors, ranks))]
    k_grads = [None if U is None else stacked([s.factors[i].grad[:, :r] for s in storages])
               for i, (U, r) in enumerate(zip(first.factors, ranks))]
    moments = None
    if adam is not None and first.moments is not None:
        per_buffer = zip(*(s.moments.tensors() for s in storages))
        moments = AdamMoments(*(stacked([t[index] for t in buffers]) for buffers in per_buffer))
        if first.moments.factors is not None:
            moments.factors = [
                None if f is None else AdamMoments(*(stacked(list(t)) for t in zip(
                    *(active_factor_moments(s.moments.factors[i], r).tensors() for s in storages))))
                for i, (f, r) in enumerate(zip(first.moments.factors, ranks))]

    # Q_i of Mat_i(C)^T = Q_i R_i (Tucker); a matrix adapter has Q = I
    qs = [None if first.matrix or U is None else torch.linalg.qr(batch_unfold(core, i).mT)[0]
          for i, U in enumerate(factors)]
    k_grads = [G if G is None or Q is None else G[..., : Q.shape[-1]] for G, Q in zip(k_grads, qs)]
    storage_ranks = first.storage_ranks()
    k_dirs, factor_moments = precondition_k_grads(k_grads, moments, adam)
    new_bases: list[Tensor | None] = []
    found: list[Tensor | None] = []
    for i, U in enumerate(factors):
        if U is None:
            new_bases.append(None)
            found.append(None)
            continue
        r = U.shape[-1]
        new, count = batch_augment(U, k_dirs[i], min(r, storage_ranks[i] - r))
        new_bases.append(new)
        found.append(count)
    grad_hat = batch_augmented_gradient(core_grad, k_grads, new_bases, qs)
    shape = list(grad_hat.shape[1:])
    core_pad = batch_pad(core, shape)
    if moments is None:
        core_hat = core_pad - lr * grad_hat
    else:
        moments = batch_pad_moments(moments, shape)
        direction, moments = adam_direction(grad_hat, moments, adam["betas"], adam["eps"])
        if factor_moments is not None:
            leading = (slice(None), *[slice(0, r) for r in ranks])
            direction = batch_augmented_gradient(direction[leading], k_dirs, new_bases, qs)
            moments.factors = factor_moments
        core_hat = core_pad - lr * (direction + adam.get("weight_decay", 0.0) * core_pad)
    bases = [None if U is None else torch.cat([U, new], dim=-1) for U, new in zip(factors, new_bases)]
    svds: list[tuple[Tensor, Tensor] | None] = []
    for i, U in enumerate(bases):
        if U is None:
            svds.append(None)
            continue
        P, sigma, _ = torch.linalg.svd(batch_unfold(core_hat, i), full_matrices=False)
        svds.append((P, sigma))
    return GroupProposal(storages=storages, bases=bases, core=core_hat, svds=svds, found=found, moments=moments,
                         qs=qs)


def group_ranks(proposal: GroupProposal, sigmas: list[Tensor | None], found: list[list[int] | None]
                ) -> list[list[int] | None]:
    """The tau rule per adapter and mode from host copies of the singular values; None = needs the per-adapter
    path (the projected gradient had fewer directions than the batched augmentation assumed)."""
    first = proposal.storages[0]
    storage_ranks = first.storage_ranks()
    out: list[list[int] | None] = []
    for b, s in enumerate(proposal.storages):
        bounds = s.bounds
        ranks: list[int] = []
        for i, U_hat in enumerate(proposal.bases):
            if U_hat is None:
                ranks.append(proposal.core.shape[i + 1])
                continue
            added = U_hat.shape[-1] - s.ranks[i]
            if found[i] is not None and found[i][b] < added:
                ranks = None
                break
            cap = min(bounds.r_max, storage_ranks[i])
            ranks.append(truncation_rank(sigmas[i][b], bounds.tau, bounds.r_min, cap, bounds.absolute))
        if ranks is not None and first.matrix:
            ranks = [min(ranks)] * 2        # U S V^T: the two modes share the truncated rank
        out.append(ranks)
    return out


@dataclass
class GroupResult:
    """New tensors of a group, zero past each adapter's new rank (shapes as in :class:`GroupProposal`)."""

    core: Tensor
    factors: list[Tensor | None]
    moments: AdamMoments | None
    ranks: list[list[int]]
    rank_table: Tensor                # the same ranks on the device, (B, d) int64


def apply_group(proposal: GroupProposal, ranks: list[list[int]], rank_table: Tensor) -> GroupResult:
    """Step 3 with the agreed ranks (``ranks[b]`` per adapter): factors ``(B, n_i, K_i)`` and core ``(B, K_1, ...)``
    with ``K_i = max_b k_b``; columns past adapter b's own ``k_b`` are masked to zero. ``rank_table``: ``ranks`` as an
    int64 ``(B, d)`` tensor on the device."""
    core = proposal.core
    device = core.device
    factors: list[Tensor | None] = []
    rotations: list[Tensor | None] = []
    for i, (U_hat, svd) in enumerate(zip(proposal.bases, proposal.svds)):
        if U_hat is None:
            factors.append(None)
            rotations.append(None)
            continue
        P, sigma = svd
        r_hat, m = P.shape[-2], P.shape[-1]
        # zero core: keep the leading columns of the current basis (P = I)
        eye = torch.eye(r_hat, m, dtype=P.dtype, device=device)
        zero_core = sigma[:, :1] <= 0 if m > 0 else torch.ones(P.shape[0], 1, dtype=torch.bool, device=device)
        P = torch.where(zero_core[:, :, None], eye, P)
        # keep K = max_b k_b columns, those past k_b masked to zero
        width = max(rs[i] for rs in ranks)
        mask = torch.arange(width, device=device)[None, :] < rank_table[:, i, None]       # (B, K)
        P_k = P[..., :width] * mask.to(P.dtype)[:, None, :]                               # (B, r̂_i, K)
        core = batch_mode_dot(core, P_k.mT, i)
        factors.append(U_hat @ P_k)
        rotations.append(P_k)
    moments = None if proposal.moments is None else batch_rotate_moments(proposal.moments, rotations)
    if moments is not None and proposal.moments.factors is not None:
        moments.factors = batch_transport_factor_moments(proposal, rotations, core, ranks, rank_table)
    return GroupResult(core=core, factors=factors, moments=moments, ranks=ranks, rank_table=rank_table)


def batch_transport_factor_moments(proposal: GroupProposal, rotations: list[Tensor | None], core: Tensor,
                                   ranks: list[list[int]], rank_table: Tensor) -> list[AdamMoments | None]:
    """``step.transport_factor_moments`` for a group: the K-gradient moments in the new cores' column coordinates,
    zero past each adapter's new width. Matrix: ``T = P_other[:r_other, :k]`` batched; Tucker: per adapter."""
    old_ranks = list(proposal.storages[0].ranks)
    out: list[AdamMoments | None] = []
    for i, state in enumerate(proposal.moments.factors):
        if state is None:
            out.append(None)
            continue
        if proposal.storages[0].matrix:
            other = 1 - i
            T = rotations[other][:, : old_ranks[other], :]                    # (B, r_other, K), masked columns 0
            mask = (torch.arange(T.shape[-1], device=T.device) < rank_table[:, other, None]).to(T.dtype)[:, None, :]
            new = transport_columns(state, T)
            out.append(AdamMoments(*(t * mask for t in new.tensors())))
            continue
        per_adapter = []
        width = 0
        for b, ks in enumerate(ranks):
            core_b = core[b][tuple(slice(0, k) for k in ks)]
            rot_b = [None if P is None else P[b][:, :k] for P, k in zip(rotations, ks)]
            q_new = unfolding_bases(core_b, [P is not None for P in rot_b], False)[i]
            T = column_transport(proposal.qs[i][b], q_new, rot_b, i, old_ranks, ks)
            per_adapter.append(transport_columns(AdamMoments(*(t[b] for t in state.tensors())), T))
            width = max(width, T.shape[1])
        out.append(AdamMoments(*(torch.stack([batch_pad(t.tensors()[k][None], [t.tensors()[k].shape[0], width])[0]
                                              for t in per_adapter]) for k in range(4))))
    return out


def reorthonormalize(result: GroupResult, b: int, i: int) -> None:
    """``step.apply``'s float32 repair for adapter b, mode i: ``U = Q R``, ``U <- Q``, ``C <- C x_i R``."""
    k = result.ranks[b][i]
    Q, R = orthonormalize(result.factors[i][b, :, :k])
    result.factors[i][b, :, :k] = Q
    index = tuple(slice(0, r) for r in result.ranks[b])
    result.core[b][index] = mode_dot(result.core[b][index], R, i)


def write_group(storages: list[LowRankStorage], result: GroupResult) -> None:
    """``LowRankStorage.write`` for every adapter of the group, one ``_foreach_`` call per tensor kind: the core and
    Adam buffers padded to the storage, the factors' leading ``K_i`` columns copied and the columns the old rank used
    past them zeroed (everything past the old rank is zero already: the storage's invariant)."""
    first = storages[0]
    shape = first.storage_ranks()
    old = list(first.ranks)           # one group, one set of ranks
    torch._foreach_copy_([s.core for s in storages], list(batch_pad(result.core, shape).unbind(0)))
    for i, new in enumerate(result.factors):
        if new is None:
            continue
        width = new.shape[-1]
        torch._foreach_copy_([s.factors[i][:, :width] for s in storages], list(new.unbind(0)))
        if width < old[i]:
            torch._foreach_zero_([s.factors[i][:, width:old[i]] for s in storages])
    if result.moments is not None and first.moments is not None:
        for j, new in enumerate(result.moments.tensors()):
            torch._foreach_copy_([s.moments.tensors()[j] for s in storages], list(batch_pad(new, shape).unbind(0)))
        if result.moments.factors is not None and first.moments.factors is not None:
            for i, new in enumerate(result.moments.factors):
                if new is None:
                    continue
                for j, t in enumerate(new.tensors()):
                    bufs = [s.moments.factors[i].tensors()[j] for s in storages]
                    width = t.shape[-1]
                    torch._foreach_copy_([b[:, :width] for b in bufs], list(t.unbind(0)))
                    if width < old[i]:
                        torch._foreach_zero_([b[:, width:old[i]] for b in bufs])
    for s, ranks in zip(storages, result.ranks):
        s.ranks[:] = ranks
    torch._foreach_copy_([s.rank_buffer for s in storages], list(result.rank_table.unbind(0)))


def to_host(tensors: list[Tensor]) -> list[Tensor]:
    """Copies of ``tensors`` on the CPU with one synchronisation (CUDA: asynchronous copies, then one wait)."""
    if not tensors:
        return []
    device = tensors[0].device
    if device.type == "cuda":
        copies = [t.to("cpu", non_blocking=True) for t in tensors]
        torch.cuda.current_stream(device).synchronize()
        return copies
    return [t.cpu() for t in tensors]


# ----------------------------------------------------------------------------- the whole step
class BatchedStep:
    """One integrator step for all ``storages``: ``propose`` (with the rank-decision sync), then ``apply`` with the
    agreed ranks (with the orthonormality sync), then ``write``. Nothing is written before ``write``.

    ``fallback(storage) -> step.Proposal`` is the per-adapter proposal, used for adapters with a rank-deficient
    projected gradient. ``ranks`` lists the proposed ranks per storage, in the order of ``storages``.
    """

    def __init__(self, storages: list[LowRankStorage], lr: float, adam: dict | None,
                 fallback: Callable[[LowRankStorage], Proposal]):
        self.storages = storages
        self.device = storages[0].core.device
        groups: dict[tuple, list[int]] = {}
        for n, s in enumerate(storages):
            groups.setdefault(group_key(s), []).append(n)
        self.members = list(groups.values())
        self.proposals = [propose_group([storages[n] for n in members], lr, adam) for members in self.members]
        # one host sync: the singular values and found directions of every adapter
        pending = [t for p in self.proposals for t in [*(None if svd is None else svd[1] for svd in p.svds),
                                                       *p.found] if t is not None]
        host = iter(to_host(pending))
        self.ranks: list[list[int]] = [[] for _ in storages]
        self.fallbacks: dict[int, Proposal] = {}
        for members, p in zip(self.members, self.proposals):
            sigmas = [None if svd is None else next(host) for svd in p.svds]
            found = [None if f is None else next(host).tolist() for f in p.found]
            for n, ranks in zip(members, group_ranks(p, sigmas, found)):
                if ranks is None:
                    self.fallbacks[n] = fallback(storages[n])
                    ranks = self.fallbacks[n].ranks
                self.ranks[n] = list(ranks)
        self.results: list[GroupResult] = []
        self.fallback_results: dict[int, tuple] = {}

    def apply(self, ranks: list[list[int]]) -> None:
        """Truncate with the agreed ``ranks`` (one list per storage) and repair float32 round-off."""
        grouped = [[ranks[n] for n in members] for members in self.members]
        # one host-to-device copy of every group's ranks (CUDA: from pinned memory, asynchronous)
        flat = torch.tensor([k for group in grouped for rs in group for k in rs], dtype=torch.int64)
        if self.device.type == "cuda":
            flat = flat.pin_memory().to(self.device, non_blocking=True)
        else:
            flat = flat.to(self.device)
        offsets = [0]
        for group in grouped:
            offsets.append(offsets[-1] + len(group) * len(group[0]))
        self.results = [apply_group(p, group, flat[start:end].view(len(group), -1))     # (B, d)
                        for p, group, start, end in zip(self.proposals, grouped, offsets, offsets[1:])]
        self.fallback_results = {n: apply(p, ranks[n]) for n, p in self.fallbacks.items()}
        # one host sync: which bases lost orthonormality (max |U^T U - I| above orthonormality_tolerance(U))
        checks = [(result, i) for result in self.results for i, U in enumerate(result.factors) if U is not None]
        errors = to_host([batch_orthogonality_error(result.factors[i], result.rank_table[:, i])
                          for result, i in checks])
        for (result, i), error in zip(checks, errors):
            for b, value in enumerate(error.tolist()):
                k = result.ranks[b][i]
                if value > orthonormality_tolerance(result.factors[i][b, :, :k]):
                    reorthonormalize(result, b, i)

    def write(self) -> None:
        for members, result in zip(self.members, self.results):
            keep = [j for j, n in enumerate(members) if n not in self.fallbacks]
            if not keep:
                continue
            if len(keep) < len(members):
                result = select(result, keep)
            write_group([self.storages[members[j]] for j in keep], result)
        for n, (core, factors, moments) in self.fallback_results.items():
            self.storages[n].write(core, factors, moments)


def select(result: GroupResult, keep: list[int]) -> GroupResult:
    """The adapters ``keep`` of a group result."""
    index = torch.tensor(keep, dtype=torch.long, device=result.core.device)
    moments = None if result.moments is None else AdamMoments(*(t[index] for t in result.moments.tensors()))
    if moments is not None and result.moments.factors is not None:
        moments.factors = [None if f is None else AdamMoments(*(t[index] for t in f.tensors()))
                           for f in result.moments.factors]
    return GroupResult(core=result.core[index], factors=[None if U is None else U[index] for U in result.factors],
                       moments=moments, ranks=[result.ranks[j] for j in keep],
                       rank_table=result.rank_table[index])

