"""``TDLRTIntegrator(..., cuda_graph=True)``: the whole integrator step captured once in a CUDA graph, then replayed.

The step's shapes never change (fixed-width storage, ranks as device tensors) and it reads nothing on the host,
so after a few eager warm-up steps it is captured as one graph; every later step copies the new gradients and the
learning rate into the graph's static inputs and replays it: a few launches instead of hundreds.

Safe when (checked, with a clear error otherwise): the adapters are on one CUDA device, the process is not part of
a ``torch.distributed`` group of more than one process (the rank broadcast is a collective outside the graph), and
the set of adapters with gradients is the same at every step (a change triggers a new capture). The graph keeps its
own memory pool for the step's intermediates. If the CUDA linear algebra of your PyTorch build synchronises inside
``torch.linalg.eigh`` or ``qr``, the capture fails: the error says so; use ``cuda_graph=False`` then.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..layers.storage import LowRankStorage

if TYPE_CHECKING:
    from .integrator import TDLRTIntegrator

WARMUP_STEPS = 3


class StepGraph:
    def __init__(self, integrator: TDLRTIntegrator, device: torch.device):
        if device.type != "cuda":
            raise ValueError(f"TDLRTIntegrator(cuda_graph=True) needs the adapters on a CUDA device; they are on "
                             f"{device}. Move the model to the GPU or use cuda_graph=False.")
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise ValueError("TDLRTIntegrator(cuda_graph=True) is single-process only (the rank agreement under "
                             "torch.distributed is a collective outside the graph); use cuda_graph=False with DDP.")
        self.integrator = integrator
        self.key: tuple | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warm = 0

    def run(self, storages: list[LowRankStorage], lr: float | Tensor, also_check: list[Tensor] | None) -> Tensor:
        params = [p for s in storages for p in s.parameters()]
        others = list(also_check or [])
        key = (tuple(id(p) for p in params), tuple((t.shape, t.dtype) for t in others))
        if key != self.key:
            self.key, self.graph, self.warm = key, None, 0
        if self.graph is None and self.warm < WARMUP_STEPS:
            # eager warm-up on a side stream (what capture requires), a real step
            self.warm += 1
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                ok = self.integrator.parallel_step(storages, torch.as_tensor(lr, device=params[0].device), others)
            torch.cuda.current_stream().wait_stream(stream)
            return ok
        if self.graph is None:
            self._capture(storages, params, others)
        torch._foreach_copy_(self.static_grads, [p.grad for p in params])
        if others:
            torch._foreach_copy_(self.static_others, others)
        self.static_lr.fill_(float(lr))
        self.graph.replay()
        return self.static_ok

    def _capture(self, storages: list[LowRankStorage], params: list, others: list[Tensor]) -> None:
        device = params[0].device
        self.static_grads = [p.grad.clone() for p in params]
        self.static_others = [t.clone() for t in others]
        self.static_lr = torch.zeros((), device=device, dtype=params[0].dtype)
        for p, g in zip(params, self.static_grads):
            p.grad = g
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.static_ok = self.integrator.parallel_step(storages, self.static_lr, self.static_others)
        except RuntimeError as error:
            raise RuntimeError(
                "TDLRTIntegrator(cuda_graph=True): capturing the step in a CUDA graph failed; an operation in it "
                f"synchronises with the host on this PyTorch/CUDA build ({error}). Use cuda_graph=False.") from error
        self.graph = graph
