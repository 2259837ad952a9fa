"""Adapters grouped for the step engine: stacked reads and masked, all-or-nothing writes, a few ops per group.

A group is stacked into one flat buffer in the compute dtype (``gather``: one allocation and one ``_foreach_copy_``,
whatever the number of adapters and tensor kinds); ``write`` puts a new group back with one ``torch.where(ok, new,
old)`` over all of its state and one ``_foreach_copy_``: a step whose gradients were not finite writes the old values
back, without the host ever reading ``ok``.

Two groupings (``partition``):

* ``"shape"``: adapters of equal storage shapes (no padding: the fewest flops, the CPU default);
* ``"padded"``: every matrix adapter of one dtype and state kind whose row counts are within ``PAD_RATIO`` of each
  other, zero-padded to the largest rows and widths of the group (the fewest kernels, the GPU default). Zero rows
  and columns change no Gram matrix, projection or Adam moment, and the rank rules carry each adapter's own storage
  width (``Bounds.cap``), so a padded step equals the per-shape one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..math.adam import AdamMoments
from ..math.engine import Bounds, Group
from ..math.geometry import compute_dtype
from .storage import LowRankStorage

GROUPINGS = ("shape", "padded", "adapter")
PAD_RATIO = 4     # "padded": the largest rows of a group at most this many times its smallest


def group_key(s: LowRankStorage, padded: bool = False) -> tuple:
    """Adapters with equal keys are stepped together: same kind, dtype, device and state (and, unless padded
    matrices, the same storage shapes)."""
    kind = (s.matrix, s.core.dtype, s.core.device, s.moments is not None, s.k_buffer is not None)
    if padded and s.matrix:
        return kind
    return (tuple(s.core.shape), tuple(None if U is None else tuple(U.shape) for U in s.factors), *kind)


def _rows(s: LowRankStorage) -> int:
    return max(U.shape[0] for U in s.factors if U is not None)


def partition(storages: list[LowRankStorage], grouping: str = "shape") -> list[list[LowRankStorage]]:
    """Groups of ``grouping`` (``GROUPINGS``; ``"adapter"``: every adapter alone), deterministic in model order."""
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}.")
    if grouping == "adapter":
        return [[s] for s in storages]
    padded = grouping == "padded"
    groups: dict[tuple, list[LowRankStorage]] = {}
    for s in storages:
        groups.setdefault(group_key(s, padded), []).append(s)
    if not padded:
        return list(groups.values())
    out = []
    for part in groups.values():
        if not part[0].matrix:
            out.append(part)
            continue
        bucket: list[LowRankStorage] = []      # greedy row buckets of ratio <= PAD_RATIO, by increasing rows
        for s in sorted(part, key=_rows):
            if bucket and _rows(s) > PAD_RATIO * _rows(bucket[0]):
                out.append(bucket)
                bucket = []
            bucket.append(s)
        out.append(bucket)
    return out


def bounds_of(storages: list[LowRankStorage]) -> Bounds:
    """The rank rules as device tensors (built once per group by the caller's cache); ``cap`` (B, d): each adapter's
    own storage widths ``R_i`` (a padded group may be wider)."""
    device = storages[0].core.device
    dtype = compute_dtype(storages[0].core.dtype)
    caps = [list(s.core.shape) for s in storages]
    return Bounds(tau=torch.tensor([s.bounds.tau for s in storages], dtype=dtype, device=device),
                  r_min=torch.tensor([s.bounds.r_min for s in storages], device=device),
                  r_max=torch.tensor([s.bounds.r_max for s in storages], device=device),
                  absolute=torch.tensor([s.bounds.absolute for s in storages], device=device),
                  cap=torch.tensor(caps, device=device))


@dataclass
class Gathered:
    group: Group
    core_grad: Tensor | None
    k_grads: list[Tensor | None]
    state: Tensor | None = None        # the flat buffer behind the group's state (what ``write`` compares with)
    k_grad_rows: Tensor | None = None  # the K-gradients stacked by rows (B, sum_i N_i, W_k); k_grads are views


def step_widths(storages: list[LowRankStorage], full: bool = False) -> list[int]:
    """Per mode, how many leading columns the step needs: ``min(max_b R_i, 2 max_b w_b)`` with ``w_b`` an adapter's
    host width (at least its rank, ``rank_mirror.py``), since a step at most doubles a rank; columns past it are zero
    before and after the step. ``full``: the whole storage (fixed shapes, for a CUDA graph)."""
    widths = []
    for i, U in enumerate(storages[0].factors):
        storage = max(s.core.shape[i] for s in storages)
        widths.append(storage if U is None or full else min(storage, 2 * max(s.ranks[i] for s in storages)))
    return widths


def k_layout(rows: list[int | None], widths: list[int]) -> list[tuple[int, int, int] | None]:
    """(first row, rows, width) of each factorized mode in a stacked K-moment buffer (modes stacked by rows)."""
    layout: list[tuple[int, int, int] | None] = []
    start = 0
    for n, w in zip(rows, widths):
        layout.append(None if n is None else (start, n, w))
        start += 0 if n is None else n
    return layout


@dataclass
class Layout:
    """Shapes of one group's stacked tensors: ``widths`` W_i, ``rows`` N_i (None: mode not factorized) and the width
    of the K-moment buffer (``B x 4 x sum_i N_i x W_k``)."""

    widths: list[int]
    rows: list[int | None]
    k_width: int

    @staticmethod
    def of(storages: list[LowRankStorage], widths: list[int]) -> Layout:
        rows = [None if U is None else max(s.factors[i].shape[0] for s in storages)
                for i, U in enumerate(storages[0].factors)]
        return Layout(widths, rows, max(w for n, w in zip(rows, widths) if n is not None))

    def state_shapes(self, B: int, moments: bool, k_moments: bool) -> list[tuple[int, ...]]:
        """core, factors, core moments (4), K-moment buffer: the order of ``state_tensors``."""
        core = (B, *self.widths)
        shapes = [core, *((B, n, w) for n, w in zip(self.rows, self.widths) if n is not None)]
        if moments:
            shapes += [core] * 4
        if k_moments:
            shapes.append((B, 4, sum(n for n in self.rows if n is not None), self.k_width))
        return shapes

    def grad_shapes(self, B: int) -> list[tuple[int, ...]]:
        """The core's gradient and the K-gradients stacked by rows (B, sum_i N_i, W_k), like the K-moments."""
        return [(B, *self.widths), (B, sum(n for n in self.rows if n is not None), self.k_width)]

    def k_views(self, rows: Tensor) -> list[Tensor | None]:
        """Per-mode views (B, N_i, W_i) of tensors stacked by rows (B, sum_i N_i, W_k)."""
        return [None if e is None else rows[:, e[0]:e[0] + e[1], :e[2]] for e in k_layout(self.rows, self.widths)]


def carve(flat: Tensor, shapes: list[tuple[int, ...]]) -> list[Tensor]:
    """Consecutive views of ``flat`` with the given shapes."""
    sizes = [math.prod(s) for s in shapes]
    return [t.view(s) for t, s in zip(flat.split(sizes), shapes)]


def state_tensors(group: Group, layout: Layout, k_moments: bool) -> list[Tensor]:
    """The stacked state of a group in the order of ``Layout.state_shapes``."""
    out = [group.core, *(U for U in group.factors if U is not None)]
    if group.moments is not None:
        out += list(group.moments.tensors())
        if k_moments:
            out.append(group.k_buffer)
    return out


def adapter_views(storages: list[LowRankStorage], stacked: list[Tensor], layout: Layout, grads: bool = False
                  ) -> tuple[list[Tensor], list[Tensor]]:
    """Pairs (adapter tensor slice, stacked slice) for every adapter and tensor kind: the leading ``min(W_i, R_i)``
    columns and the adapter's own rows. ``stacked``: the state (``state_tensors``) or, with ``grads``, the gradients
    (core, factors)."""
    mine: list[Tensor] = []
    theirs: list[Tensor] = []
    k_modes = [e for e in k_layout(layout.rows, layout.widths) if e is not None]
    for b, s in enumerate(storages):
        index = tuple(slice(0, min(w, n)) for w, n in zip(layout.widths, s.core.shape))
        core = s.core.grad if grads else s.core
        own = [core[index]]
        own += [(U.grad if grads else U)[:, :index[i].stop] for i, U in enumerate(s.factors) if U is not None]
        dims = [index] + [(slice(0, U.shape[0]), index[i]) for i, U in enumerate(s.factors) if U is not None]
        if not grads and len(stacked) > len(dims):
            own += [t[index] for t in s.moments.tensors()]
            dims += [index] * 4
        pairs = list(zip(own, [t[b][d] for t, d in zip(stacked, dims)]))
        if not grads and len(stacked) > len(dims):            # the K-moment buffer, mode by mode
            width = min(layout.k_width, s.k_buffer.shape[-1])
            K, start = stacked[len(dims)], 0
            for (first, _, _), U in zip(k_modes, [U for U in s.factors if U is not None]):
                n = U.shape[0]
                pairs.append((s.k_buffer[:, start:start + n, :width], K[b, :, first:first + n, :width]))
                start += n
        mine += [p[0] for p in pairs]
        theirs += [p[1] for p in pairs]
    return mine, theirs


def _padded(storages: list[LowRankStorage], layout: Layout) -> bool:
    """Whether some entry of the stacked tensors is not copied from an adapter (then it must be zero)."""
    narrow_modes = any(w < layout.k_width for w, n in zip(layout.widths, layout.rows) if n is not None)
    narrow = any(min(w, n) < w for s in storages for w, n in zip(layout.widths, s.core.shape))
    short = any(U.shape[0] < n for s in storages for U, n in zip(s.factors, layout.rows) if U is not None)
    narrow_k = any(s.k_buffer is not None and s.k_buffer.shape[-1] < layout.k_width for s in storages)
    return narrow_modes or narrow or short or narrow_k


def gather(storages: list[LowRankStorage], with_moments: bool, with_grads: bool = True, full: bool = False
           ) -> Gathered:
    """Stack one group's tensors in the compute dtype (float32 for half-precision storage), sliced to the leading
    :func:`step_widths` (the zero columns past them are not copied), zero-padded to the group's rows and widths."""
    first = storages[0]
    dtype = compute_dtype(first.core.dtype)
    layout = Layout.of(storages, step_widths(storages, full))
    B = len(storages)
    moments = with_moments and first.moments is not None
    k_moments = moments and first.k_buffer is not None
    state_shapes = layout.state_shapes(B, moments, k_moments)
    shapes = state_shapes + (layout.grad_shapes(B) if with_grads else [])
    total = sum(math.prod(s) for s in shapes)
    make = torch.zeros if _padded(storages, layout) else torch.empty
    flat = make(total, dtype=dtype, device=first.core.device)
    views = carve(flat, shapes)
    state, grads = views[:len(state_shapes)], views[len(state_shapes):]
    mine, theirs = adapter_views(storages, state, layout)
    if with_grads:
        grads = [grads[0], *(t for t in layout.k_views(grads[1]) if t is not None)]
        more = adapter_views(storages, grads, layout, grads=True)
        mine, theirs = mine + more[0], theirs + more[1]
    torch._foreach_copy_(theirs, mine)
    factored = iter(state[1:])
    factors = [None if n is None else next(factored) for n in layout.rows]
    group = Group(core=state[0], factors=factors, ranks=torch.stack([s.rank_buffer for s in storages]),
                  matrix=first.matrix)
    if moments:
        nf = sum(n is not None for n in layout.rows)
        group.moments = AdamMoments(*state[1 + nf:5 + nf])
        if k_moments:
            group.k_buffer = state[5 + nf]
            group.k_layout = k_layout(layout.rows, layout.widths)
    state_flat = flat[:sum(math.prod(s) for s in state_shapes)]
    if not with_grads:
        return Gathered(group, None, [], state_flat)
    k_rows = views[len(state_shapes) + 1]
    return Gathered(group, grads[0], layout.k_views(k_rows), state_flat, k_rows)


@torch.no_grad()
def write(storages: list[LowRankStorage], new: Group, ok: Tensor | None = None, old: Gathered | None = None) -> None:
    """Store ``new`` (zeros past its ranks) in the leading slices of every adapter of the group (the shape of
    ``new``; the columns past it are zero and stay so), or keep the old values where ``ok`` is a False (0-dim bool)
    tensor (``old``: the group as gathered before the step). The host rank mirrors are not touched
    (``rank_mirror.py``)."""
    widths = list(new.core.shape[1:])
    layout = Layout.of(storages, widths)
    k_moments = new.moments is not None and new.k_buffer is not None and storages[0].k_buffer is not None
    stacked = state_tensors(new, layout, k_moments)
    ranks = new.ranks
    if ok is not None:
        shapes = [tuple(t.shape) for t in stacked]
        if new.core.device.type == "cuda":
            # one kernel: a GPU pays per launch (the concatenation is one more pass over the state)
            stacked = carve(torch.where(ok, torch.cat([t.reshape(-1) for t in stacked]), old.state), shapes)
        else:
            # one pass per kind: a CPU pays per byte
            stacked = [torch.where(ok, t, o) for t, o in zip(stacked, carve(old.state, shapes))]
        ranks = torch.where(ok, ranks, old.group.ranks)
    mine, theirs = adapter_views(storages, stacked, layout)
    torch._foreach_copy_(mine + [s.rank_buffer for s in storages], theirs + list(ranks.unbind(0)))
