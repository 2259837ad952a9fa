"""Model-level queries of the adapters: every low-rank storage, their ranks and active parameter counts."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from .storage import LowRankStorage


def iter_storages(model: nn.Module, adapter_name: str | None = None) -> Iterator[LowRankStorage]:
    """Every low-rank adapter of ``model`` (active adapters only, unless ``adapter_name`` names one)."""
    for module_name, module in model.named_modules():
        storages = getattr(module, "tdlrt_storages", None)
        if callable(storages):
            yield from storages(module_name, adapter_name)


def adapter_ranks(model: nn.Module, adapter_name: str | None = None) -> dict[str, tuple[int, ...]]:
    """Module name -> current rank per adaptive mode (matrix adapters: ``(r, r)``)."""
    return {s.name: tuple(r for U, r in zip(s.factors, s.host_ranks()) if U is not None)
            for s in iter_storages(model, adapter_name)}


def count_active_parameters(model: nn.Module) -> int:
    """Trainable parameters with adapters counted at their active sizes (``sum n_i r_i + prod r_i``)."""
    storages = list(iter_storages(model))
    stored = {id(p) for s in storages for p in s.parameters()}
    others = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in stored)
    return others + sum(s.num_active_parameters() for s in storages if s.core.requires_grad)


def rank_statistics(model: nn.Module) -> dict[str, float]:
    """Mean/min/max rank over all adaptive modes and the active trainable parameters, for logging."""
    ranks = [r for rs in adapter_ranks(model).values() for r in rs]
    if not ranks:
        return {}
    return {"tdlrt/mean_rank": sum(ranks) / len(ranks), "tdlrt/min_rank": float(min(ranks)),
            "tdlrt/max_rank": float(max(ranks)), "tdlrt/active_params": float(count_active_parameters(model))}
