"""Host copies of the adapters' ranks, for the forward's slicing width, without a host read inside the step.

The truth is each adapter's rank buffer on the device. The forward slices its factors with a Python width that
must be at least the rank (entries past the rank are zero, so any such width gives the same output). After each
step, :func:`publish` starts one non-blocking copy of every rank buffer (and a counter the caller watches) to the
host and sets every width to a bound that cannot be too small: ``min(R_i, 2 r_i)``, since a step at most doubles a
rank. :func:`refresh`, which every adapter forward and ``LowRankStorage.active`` call first, makes the widths
exact once the copy has landed: on the CPU at the next forward, on a GPU at the first forward after the copy
completed (``Event.query``, which never waits). On the ``meta`` device there is nothing to copy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .storage import LowRankStorage


@dataclass
class _Copy:
    storages: list[LowRankStorage]
    host: Tensor
    event: torch.cuda.Event | None
    on_counter: Callable[[int], None] | None


_pending: list[_Copy] = []


def publish(storages: list[LowRankStorage], counter: Tensor | None = None,
            on_counter: Callable[[int], None] | None = None) -> None:
    """After a step: widths to their bound now, exact ranks (and ``on_counter(counter)``) at the next refresh."""
    for s in storages:
        s.ranks[:] = [n if U is None else min(U.shape[1], 2 * r) for U, r, n in zip(s.factors, s.ranks, s.core.shape)]
        if s.matrix:
            s.ranks[:] = [min(s.ranks)] * 2
    device = storages[0].core.device
    if device.type == "meta":
        return
    flat = torch.cat([*(s.rank_buffer for s in storages), *([] if counter is None else [counter.reshape(1)])])
    event = None
    if device.type == "cuda":
        host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
        host.copy_(flat, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
    else:
        host = flat.clone()
    _pending[:] = [c for c in _pending if c.storages is not storages] + [_Copy(storages, host, event,
                                                                               on_counter if counter is not None
                                                                               else None)]


def refresh() -> None:
    """Exact widths from every copy that has landed (never waits)."""
    while _pending and (_pending[0].event is None or _pending[0].event.query()):
        copy = _pending.pop(0)
        values = copy.host.tolist()
        start = 0
        for s in copy.storages:
            d = len(s.ranks)
            s.ranks[:] = values[start:start + d]
            start += d
        if copy.on_counter is not None:
            copy.on_counter(values[-1])
