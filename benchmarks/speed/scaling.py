"""The integrator step alone, against the number of adapters and the rank, batched and per-adapter.

Adapters sit on DeBERTa-base-shaped blocks (six linears: four 768x768, 768->3072, 3072->768). Ranks are pinned
(``r_min = r``, ``tau = 0.9``, ``r_max = 4 r``): every step augments r -> 2r, decomposes and truncates back to r, the
work of any step at rank r. Gradients are random at the active slices, set before each (timed) step. Wall clock
and process CPU time (the step is single-threaded on CPU, so its CPU time does not grow when other processes
compete for the cores).
"""

from __future__ import annotations

import statistics
import time

import torch
from peft import get_peft_model
from torch import nn

from tdrlt_peft import TDLRTIntegrator, TuckerAdapterConfig
from tdrlt_peft.layers import rank_mirror
from tdrlt_peft.layers.inventory import iter_storages

from .counts import count_step
from .measure import clock, profile_table

BLOCK_LINEARS = {"query_proj": (768, 768), "key_proj": (768, 768), "value_proj": (768, 768), "dense": (768, 768),
                 "intermediate": (768, 3072), "output": (3072, 768)}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        for name, (n_in, n_out) in BLOCK_LINEARS.items():
            setattr(self, name, nn.Linear(n_in, n_out, bias=False))


def adapter_stack(num_adapters: int, rank: int, device: torch.device) -> nn.Module:
    """``num_adapters / 6`` blocks with a TDLRT adapter on each linear."""
    torch.manual_seed(0)
    blocks = nn.Sequential(*(Block() for _ in range(num_adapters // 6))).to(device)
    config = TuckerAdapterConfig(r=rank, r_min=rank, r_max=4 * rank, tau=0.9, target_modules=list(BLOCK_LINEARS))
    return get_peft_model(blocks, config)


def random_gradients(model: nn.Module, g: torch.Generator) -> list[tuple[nn.Parameter, torch.Tensor]]:
    grads = []
    for s in iter_storages(model):
        core_index = tuple(slice(0, r) for r in s.ranks)
        pairs = [(s.core, core_index), *((U, (slice(None), slice(0, r))) for U, r in zip(s.factors, s.ranks))]
        for p, index in pairs:
            grad = torch.zeros(p.shape, dtype=p.dtype)
            grad[index] = torch.randn(grad[index].shape, generator=g, dtype=p.dtype)
            grads.append((p, grad.to(p.device)))
    return grads


def time_integrator(num_adapters: int, rank: int, device: torch.device, warmup: int, steps: int) -> dict:
    """Median seconds of one integrator step, batched and per-adapter (alternating), at ``lr = 1e-3`` with Adam.

    Then one more batched step, counted (``counts``: compute ops, linear-algebra calls, host reads).
    """
    model = adapter_stack(num_adapters, rank, device)
    grads = random_gradients(model, torch.Generator().manual_seed(0))
    integrators = {"batched": TDLRTIntegrator(model, batched=True),
                   "per_adapter": TDLRTIntegrator(model, batched=False)}
    times: dict[str, list[float]] = {name: [] for name in integrators}
    cpu_times: dict[str, list[float]] = {name: [] for name in integrators}
    for i in range(warmup + steps):
        for name, integrator in integrators.items() if i % 2 == 0 else reversed(integrators.items()):
            rank_mirror.refresh()      # what the forward of a real step does first: exact host widths
            for p, grad in grads:
                p.grad = grad
            start, cpu_start = clock(device), time.process_time()
            integrator.step(1e-3)
            elapsed, cpu_elapsed = clock(device) - start, time.process_time() - cpu_start
            if i >= warmup:
                times[name].append(elapsed)
                cpu_times[name].append(cpu_elapsed)
    ranks = {r for s in iter_storages(model) for r in s.host_ranks()}
    for p, grad in grads:
        p.grad = grad
    counts = count_step(integrators["batched"], 1e-3, device)          # one more (counted) batched step
    return {"num_adapters": num_adapters, "rank": rank, "ranks_after": sorted(ranks),
            "counts": {k: v for k, v in counts.items() if k != "ops"},
            **{f"{name}_s": statistics.median(t) for name, t in times.items()},
            **{f"{name}_cpu_s": statistics.median(t) for name, t in cpu_times.items()}}


def sweep(adapter_counts, ranks, base_adapters: int, base_rank: int, device: torch.device, warmup: int,
          steps: int) -> dict:
    return {"against_adapters": [time_integrator(n, base_rank, device, warmup, steps) for n in adapter_counts],
            "against_rank": [time_integrator(base_adapters, r, device, warmup, steps) for r in ranks]}


def profile_integrator(num_adapters: int, rank: int, device: torch.device) -> str:
    """``torch.profiler`` table of one batched integrator step (after one warm-up step)."""
    model = adapter_stack(num_adapters, rank, device)
    grads = random_gradients(model, torch.Generator().manual_seed(0))
    integrator = TDLRTIntegrator(model)

    def step():
        for p, grad in grads:
            p.grad = grad
        integrator.step(1e-3)

    step()
    return profile_table(step, device)
