"""Model-level queries of the adapters: every low-rank storage, their ranks and active parameter counts."""

from __future__ import annotations

import weakref
from collections.abc import Iterator

from torch import nn

from .storage import LowRankStorage

# Walking a model's module tree costs milliseconds of Python per call (a UNet: ~5 ms), and the step, the rank
# logging and the parameter count each ask for the adapters every step. So the walk is cached per model and
# reused while (1) no TDLRT layer was created since (``layer_created``, called by every layer's __init__ and
# __setstate__: deep copies and unpickled layers count) and
# (2) every module on the path from the model to each cached layer is still where it was (one dict lookup per
# link: a layer unloaded, replaced or moved out of the tree is noticed). Not noticed: an existing layer moved
# into the tree from elsewhere without any layer being created since the last walk.
_created = [0]
_walks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def layer_created() -> None:
    _created[0] += 1


def adapter_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every module of ``model`` with adapters (``tdlrt_storages``), in ``named_modules``
    order."""
    cached = _walks.get(model)
    if cached is not None and cached[0] == _created[0] and all(p._modules.get(k) is c for p, k, c in cached[2]):
        return cached[1]
    found: list[tuple[str, nn.Module]] = []
    links: set[tuple[nn.Module, str, nn.Module]] = set()
    path: dict[nn.Module, tuple[nn.Module, str] | None] = {model: None}   # each module's first parent link
    for name, module in model.named_modules():
        for key, child in module._modules.items():
            if child is not None and child not in path:
                path[child] = (module, key)
        if hasattr(type(module), "tdlrt_storages"):
            found.append((name, module))
            node = module
            while path[node] is not None:
                parent, key = path[node]
                links.add((parent, key, node))
                node = parent
    _walks[model] = (_created[0], found, list(links))
    return found


def iter_storages(model: nn.Module, adapter_name: str | None = None) -> Iterator[LowRankStorage]:
    """Every low-rank adapter of ``model`` (active adapters only, unless ``adapter_name`` names one)."""
    for module_name, module in adapter_modules(model):
        yield from module.tdlrt_storages(module_name, adapter_name)


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
