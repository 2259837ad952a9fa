"""Budget mode at the model level: which adapters share a parameter budget, whether it can be met, and the tensors
the step's budget decision (``math/budget.py``) reads.

A budget is set by ``TuckerAdapterConfig(target_params=N)`` (every adapter of that config) or
``factorize(..., target_params=N)``; each adapter's storage carries it (``LowRankStorage.budget``), so the
integrator, the BUG step and ``factorize`` find it without a config. ``check_budget`` refuses a budget outside the
adapters' reach when they are built; ``BudgetRule.ranks`` replaces the tau ranks of every budget adapter in a step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..math import engine
from ..math.budget import budget_ranks, parameter_count, parameter_range, proposal_spectrum
from .groups import bounds_of, gather, partition, write
from .storage import LowRankStorage, ParameterBudget


def sizes_of(s: LowRankStorage) -> list[int]:
    """The modes' sizes n_i of an adapter (a factorized mode: its factor's rows; otherwise the core's size)."""
    return [n if U is None else U.shape[0] for U, n in zip(s.factors, s.core.shape)]


def factored_of(s: LowRankStorage) -> list[bool]:
    return [U is not None for U in s.factors]


def storage_caps(s: LowRankStorage) -> list[int]:
    """``min(r_max, R_i)`` per mode of the adapter's own storage (a matrix: ``min(r_max, R_1, R_2)`` on both
    sides; an unfactorized mode: its size)."""
    widths = [n if U is None else min(s.bounds.r_max, U.shape[1]) for U, n in zip(s.factors, s.core.shape)]
    return [min(widths)] * len(widths) if s.matrix else widths


def budget_of(storages: list[LowRankStorage]) -> ParameterBudget | None:
    """The one budget of ``storages`` (None: every adapter keeps its tau rule); two different ones are refused."""
    budgets = list(dict.fromkeys(s.budget for s in storages if s.budget is not None))
    if len(budgets) > 1:
        described = ", ".join(f"{b.target:,} parameters ({b.owner})" for b in budgets)
        raise ValueError(f"TDLRT: the adapters stepped together carry different parameter budgets ({described}); "
                         "one step decides one budget. Train one budgeted adapter at a time (set_adapter), or "
                         "give them one config.")
    return budgets[0] if budgets else None


def check_budget(storages: list[LowRankStorage], budget: ParameterBudget, field: str) -> None:
    """Refuse a budget the adapters cannot meet, with the feasible range and the fix (``field`` names the
    setting, e.g. ``TuckerAdapterConfig.target_params``)."""
    if not storages:
        raise ValueError(f"{field}={budget.target} was given but no module was adapted.")
    floor, ceiling = parameter_range([(sizes_of(s), factored_of(s), s.matrix, s.bounds.r_min, s.bounds.r_max)
                                      for s in storages])
    if floor <= budget.target <= ceiling:
        return
    r_min = sorted({s.bounds.r_min for s in storages})
    r_max = sorted({s.bounds.r_max for s in storages})
    fix = ("raise it, lower r_min or adapt fewer modules" if budget.target < floor
           else "lower it, raise r_max or adapt more modules")
    raise ValueError(
        f"{field}={budget.target:,} cannot be met by the {len(storages)} adapted modules: they hold from {floor:,} "
        f"active parameters (every adapter at r_min={'/'.join(map(str, r_min))}) to {ceiling:,} (every adapter "
        f"at its largest rank, r_max={'/'.join(map(str, r_max))}). Choose {field.rsplit('.', 1)[-1]} in "
        f"[{floor}, {ceiling}], or {fix}.")


@torch.no_grad()
def fit_initial_ranks(storages: list[LowRankStorage], budget: ParameterBudget) -> None:
    """At creation, when the cores say nothing about where parameters matter (zero adapter cores, or the random
    Tucker tensors of ``factorize(init="random")``): cap every rank at the largest common value whose total fits
    the budget (never below ``r_min``), so the layers start within it; the steps then move it where the
    gradients are. (Truncating a random tensor by its singular values would hand the budget to the layers whose
    initialisation happens to be larger.)"""
    def total(cap: int) -> int:
        return sum(parameter_count(sizes_of(s), factored_of(s), capped(s, cap)) for s in storages)

    def capped(s: LowRankStorage, cap: int) -> list[int]:
        return [max(min(r, cap), min(s.bounds.r_min, r)) if f else r for r, f in zip(s.ranks, factored_of(s))]

    # the host mirrors are exact at creation (no step yet), also on the meta device
    top = max(r for s in storages for r, f in zip(s.ranks, factored_of(s)) if f)
    if total(top) <= budget.target:
        return
    cap = next((c for c in range(top - 1, 0, -1) if total(c) <= budget.target), 1)
    for s in storages:
        ranks = capped(s, cap)
        if ranks == s.ranks:
            continue
        core = s.core[tuple(slice(0, r) for r in ranks)]
        s.write(core, [None if U is None else U[:, :r] for U, r in zip(s.factors, ranks)], None)


class BudgetRule:
    """The budget decision of one step's groups ``[(storages, bounds)]``: per group the scales, storage caps,
    sizes and membership as device tensors (built once per set of adapters and scales, like the bounds)."""

    def __init__(self, groups: list[tuple[list[LowRankStorage], engine.Bounds]], budget: ParameterBudget,
                 outside: list[LowRankStorage]):
        self.budget = budget
        # adapters of the budget without a step now: their parameters still count (rank buffer, sizes n_i or 0)
        self.outside = [(s.rank_buffer, torch.tensor([n if f else 0 for n, f in zip(sizes_of(s), factored_of(s))],
                                                     device=s.core.device)) for s in outside]
        self.tensors = []
        for part, _ in groups:
            device = part[0].core.device
            dtype = torch.float64 if part[0].core.dtype == torch.float64 else torch.float32
            member = torch.tensor([s.budget == budget for s in part], device=device)
            self.tensors.append((torch.tensor([s.scale for s in part], dtype=dtype, device=device),
                                 torch.tensor([storage_caps(s) for s in part], device=device),
                                 torch.tensor([sizes_of(s) for s in part], device=device),
                                 member, all(s.budget == budget for s in part)))

    def ranks(self, groups: list[tuple[list[LowRankStorage], engine.Bounds]], proposals: list[engine.Proposal]
              ) -> list[Tensor]:
        """Every group's new ranks (B, d): the budget's for its adapters, the proposal's tau ranks for others."""
        spectra = [proposal_spectrum(p, scale, bounds.r_min, caps, sizes, member)
                   for p, (_, bounds), (scale, caps, sizes, member, _) in zip(proposals, groups, self.tensors)]
        decided = budget_ranks(spectra, self.budget.target - self.outside_parameters())
        return [k if every else torch.where(member[:, None], k, p.ranks)
                for k, p, (_, _, _, member, every) in zip(decided, proposals, self.tensors)]

    def outside_parameters(self) -> Tensor | int:
        """The active parameters of the budget's adapters that are not stepped (from their rank buffers)."""
        count = 0
        for ranks, sizes in self.outside:
            count = count + ranks.prod() + (sizes * ranks).sum()
        return count


def budget_rule(groups: list[tuple[list[LowRankStorage], engine.Bounds]], every_storage: list[LowRankStorage]
                ) -> BudgetRule | None:
    """The :class:`BudgetRule` of a step's groups, or None when none of their adapters has a budget."""
    budget = budget_of([s for part, _ in groups for s in part])
    if budget is None:
        return None
    stepped = {id(s.core) for part, _ in groups for s in part}
    outside = [s for s in every_storage if s.budget == budget and id(s.core) not in stepped]
    return BudgetRule(groups, budget, outside)


@torch.no_grad()
def truncate_to_budget(storages: list[LowRankStorage], budget: ParameterBudget) -> None:
    """Truncate the adapters' current Tucker tensors to the budget with the step's own truncation (no gradient:
    ``Ĉ = C``): "compress this network to N parameters" for ``factorize``. Reads the new ranks to the host."""
    groups = [(part, bounds_of(part)) for part in partition(storages)]
    proposals = []
    for part, bounds in groups:
        group = gather(part, with_moments=False, with_grads=False).group
        proposals.append(engine.truncation_proposal(group, group.factors, group.core, group.ranks, bounds, None,
                                                    [None] * len(group.factors)))
    ranks = BudgetRule(groups, budget, []).ranks(groups, proposals)
    for (part, _), proposal, k in zip(groups, proposals, ranks):
        write(part, engine.apply(proposal, k))
    for s in storages:
        s.ranks[:] = s.host_ranks()
