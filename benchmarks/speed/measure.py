"""Clocks and peak memory, the same way for both methods and on any device.

Time: ``time.perf_counter`` read after ``torch.cuda.synchronize()`` on CUDA (queued kernels count for the step that
queued them); on CPU every op is synchronous.

Peak memory of one training step = the bytes resident when it starts (every distinct tensor storage of the model's
parameters and buffers and of the optimizer state; gradients are None between steps for both methods) + the peak
growth of allocated memory during the step:

* CUDA: ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()`` after ``reset_peak_memory_stats``.
* CPU: the same quantity from PyTorch's CPU allocator, read from the profiler's allocation events
  (``profile_memory=True``: each event carries the bytes allocated since profiling started). This counts tensor
  memory only, exactly (no sampling, no RSS noise from the other model in the process or from freed-but-cached
  pages), so the two methods measured in one process do not see each other. The profiled step is an extra,
  untimed step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> float:
    synchronize(device)
    return time.perf_counter()


def resident_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and shared tensors counted once)."""
    seen: dict[tuple, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[(t.device, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def step_peak_growth(step: Callable[[], object], device: torch.device) -> int:
    """Peak of (allocated bytes - allocated bytes at the start) while ``step()`` runs."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    if device.type != "cpu":
        raise ValueError(f"peak memory is measured on cpu and cuda, not {device.type}")
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    peak = 0
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            peak = max(peak, node.extra_fields.total_allocated)
    return peak


def profile_table(step: Callable[[], object], device: torch.device, rows: int = 30) -> str:
    """``torch.profiler`` table of one ``step()``: operators sorted by their own time (CUDA time on CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        synchronize(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=rows)
