"""``TDLRTIntegrator``: the rank-adaptive step for every adapter of a model, for any training loop.

Usage in a plain PyTorch loop::

    integrator = TDLRTIntegrator(model)              # finds every TDLRT adapter / factorized layer
    optimizer = torch.optim.AdamW(integrator.other_trainable_parameters(), lr=lr)
    loss.backward()
    integrator.step(lr)                              # augment, update the core, truncate; clears factor grads
    optimizer.step(); optimizer.zero_grad()

The step runs the engine of ``math/engine.py`` once per group of same-shaped adapters and never reads a value on
the host: whether the gradients are finite, the ranks and every write are decided on the device (a step with a
non-finite gradient writes the old values back). Adapters with a parameter budget (``target_params``) take their
ranks from one decision over all of them (``layers/budget.py``, ``math/budget.py``) instead of their tau rule,
before the agreement. Under ``torch.distributed`` the ranks chosen on process 0 are
broadcast in one collective, so every process truncates identically. The Python rank mirrors that the forward
slices with (``layers/rank_mirror.py``) follow from one non-blocking copy.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from ..layers import rank_mirror
from ..layers.budget import budget_rule
from ..layers.groups import GROUPINGS, bounds_of, gather, partition, write
from ..layers.inventory import iter_storages
from ..layers.storage import LowRankStorage
from ..math import engine
from ..math.geometry import freeze_step, frozen, truncates
from ..math.threads import single_threaded_linalg

CORE_OPTIMIZERS = engine.CORE_OPTIMIZERS
DEFAULT_CORE_OPTIMIZER = engine.DEFAULT_CORE_OPTIMIZER


class TDLRTIntegrator:
    """Runs the parallel rank-adaptive step (``docs/algorithm.md``) on every adapter of ``model``.

    Args:
        model: any module containing TDLRT adapter layers or factorized layers (PeftModel or bare model).
        core_optimizer: ``"adam_factors"`` (the default: Adam, with the core's old block moved along the factors'
            Adam directions, as LoRA's factors are: ``engine.factor_direction``; the two-pass step, which has a core
            gradient of its own for every block, takes plain ``"adam"``'s core step), ``"adam"`` (moments owned
            here, stored in the layers' buffers and transported across basis changes, see ``adam.py``; every core
            entry moves by about lr), ``"adam_normalized"`` (``"adam"`` with the step divided by
            ``sqrt(prod_i r̂_i)``: ``engine.adam_core_update``) or ``"sgd"`` (the exact projected-gradient step of
            the theory).
        betas, eps, weight_decay: Adam settings for the core (decoupled weight decay).
        lr_factor: the step uses ``lr * lr_factor``.
        batched: step adapters together in groups (whatever their ranks); ``False`` makes every adapter a group of
            its own (same result, more kernels): ``grouping="adapter"``.
        grouping: how adapters are grouped (``layers/groups.py``): ``"shape"`` (equal storage shapes: fewest flops),
            ``"padded"`` (every matrix adapter of similar row counts in one zero-padded group: fewest kernels),
            ``"adapter"``, or ``"auto"``: padded on a GPU, where a step costs its launches, by shape on a CPU,
            where it costs its flops. All give the same step.
        cuda_graph: capture the whole step in a CUDA graph on its first steps and replay it after (``cuda_graph.py``;
            CUDA only, single process). Steps that do not truncate by tau or have frozen ranks run eagerly.
        truncation_interval: the tolerance rule runs every this many steps and at the last one
            (``geometry.truncates``); the steps in between keep every augmented direction up to ``r_max``. 1: every
            step (the default).

    Rank schedule (host counters; :meth:`set_run_length` sets the last two, as ``TDLRTCallback`` does from the
    Trainer's state and ``TDLRTOptimizer`` from its ``total_steps``):
    ``step_index`` (0-based optimizer step, advanced by :meth:`step`), ``total_steps`` (None: unknown, no forced
    last truncation) and ``freeze_step`` (ranks stay as decided by the last truncation step at or before it,
    ``geometry.frozen``; None: never).
    """

    def __init__(self, model: nn.Module,
                 core_optimizer: Literal["adam", "adam_normalized", "adam_factors", "sgd"] = DEFAULT_CORE_OPTIMIZER,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 lr_factor: float = 1.0, batched: bool = True, cuda_graph: bool = False,
                 grouping: str = "auto", truncation_interval: int = 1):
        if core_optimizer not in CORE_OPTIMIZERS:
            raise ValueError(f"core_optimizer must be one of {CORE_OPTIMIZERS}, got {core_optimizer!r}.")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"betas must lie in [0, 1), got {betas}.")
        self.model = model
        self.core_optimizer = core_optimizer
        # the core's Adam settings (engine.propose, bug.galerkin_proposal); None: the SGD core
        self.adam = None if core_optimizer == "sgd" else {
            "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
            "normalize": core_optimizer == "adam_normalized", "factors": core_optimizer == "adam_factors"}
        self.lr_factor = lr_factor
        if grouping not in ("auto", *GROUPINGS):
            raise ValueError(f"grouping must be 'auto' or one of {GROUPINGS}, got {grouping!r}.")
        self.grouping = grouping if batched else "adapter"
        truncates(0, truncation_interval)                  # validates the interval
        self.truncation_interval = truncation_interval
        self.step_index = 0
        self.total_steps: int | None = None
        self.freeze_step: int | None = None
        storages = list(iter_storages(model))
        if not storages:
            raise ValueError(
                "TDLRTIntegrator found no TDLRT adapters in the model: wrap it with "
                "`get_peft_model(model, TuckerAdapterConfig(...))` or use tdrlt_peft factorized layers.")
        device = storages[0].core.device
        # counters on the device: reading them is a host read, done only when asked (num_steps, num_skipped)
        self._taken = torch.zeros((), dtype=torch.int64, device=device)
        self._skipped = torch.zeros((), dtype=torch.int64, device=device)
        self._skipped_on_host = 0
        self._seen_skips = 0                     # device skips the rank mirror has reported
        self._warned_skip = False
        self._groups: dict[tuple, tuple[list[LowRankStorage], engine.Bounds]] = {}
        self._budget_key: tuple | None = None          # the adapters (and scales, budgets) of the cached rule
        self._budget_rule = None
        self.graph = None
        if cuda_graph:
            from .cuda_graph import StepGraph

            self.graph = StepGraph(self, device)

    # ----------------------------------------------------------------- bookkeeping
    @property
    def num_steps(self) -> int:
        """Steps taken (a host read)."""
        return int(self._taken)

    @property
    def num_skipped(self) -> int:
        """Steps skipped because a gradient was not finite (a host read; warns once if a skip was not seen yet)."""
        rank_mirror.refresh()
        return int(self._skipped) + self._skipped_on_host

    def storages(self) -> list[LowRankStorage]:
        return list(iter_storages(self.model))

    def other_trainable_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters that are not adapter factors (heads, biases, ...) for the user's optimizer."""
        stored = {id(p) for s in iter_storages(self.model) for p in s.parameters()}
        return [p for p in self.model.parameters() if p.requires_grad and id(p) not in stored]

    def zero_grad(self, storages: list[LowRankStorage] | None = None) -> None:
        for s in iter_storages(self.model) if storages is None else storages:
            for p in s.parameters():
                p.grad = None
            s.tracker.after_step()

    def groups(self, storages: list[LowRankStorage]) -> list[tuple[list[LowRankStorage], engine.Bounds]]:
        """Storages grouped by shape with their rank rules on the device (cached while the adapters stay the same)."""
        key = tuple(id(s.core) for s in storages)
        cached = self._groups.get(key)
        if cached is None:
            grouping = self.grouping
            if grouping == "auto":
                grouping = "padded" if storages[0].core.device.type == "cuda" else "shape"
            parts = partition(storages, grouping)
            cached = [(part, bounds_of(part)) for part in parts]
            self._groups = {key: cached}
        return cached

    # ----------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, lr: float | Tensor, closure: Callable[[], object] | None = None,
             also_check: list[Tensor] | None = None) -> Tensor | bool:
        """One rank-adaptive step at learning rate ``lr * lr_factor`` for every adapter with gradients.

        With a ``closure`` (recomputes the loss on the same batch and calls backward) it is the paper's two-pass
        BUG step instead of the parallel one, see ``bug.py``. ``also_check``: more gradients whose non-finite
        entries skip the step too (the Trainer's other parameters under an fp16 scaler). Returns whether the step
        was taken as a 0-dim bool tensor on the device (``bool()`` of it is a host read): a non-finite gradient
        changes nothing but clearing the factor gradients.
        """
        if closure is not None:
            from .bug import bug_step

            try:
                return bug_step(self, lr, closure)
            finally:
                self.step_index += 1
        every_storage = list(iter_storages(self.model))
        storages = [s for s in every_storage if s.core.grad is not None]
        if not storages:
            self.zero_grad(every_storage)
            return False
        if storages[0].core.device.type == "cuda":
            rank_mirror.refresh()      # an earlier copy that has landed (Event.query: never waits)
        try:
            if self.graph is not None and self.plain_step():
                ok = self.graph.run(storages, lr * self.lr_factor, also_check)
            else:
                # all of the step on one thread on CPU: every tensor in it is small
                with single_threaded_linalg(storages[0].core.device):
                    ok = self.parallel_step(storages, lr * self.lr_factor, also_check)
            self.publish(storages)
            return ok
        finally:
            self.step_index += 1
            self.zero_grad(every_storage)

    def set_run_length(self, total_steps: int | None, rank_freeze_fraction: float | None = None) -> None:
        """The run's optimizer steps: its last step truncates, and ``rank_freeze_fraction`` f freezes the ranks from
        step ``ceil(f total_steps)``. None: unknown (no forced last truncation, no freeze)."""
        self.total_steps = total_steps
        self.freeze_step = None if total_steps is None else freeze_step(rank_freeze_fraction, total_steps)

    def plain_step(self) -> bool:
        """Whether this step truncates by tau with free ranks (the only kind a CUDA graph captures)."""
        return truncates(self.step_index, self.truncation_interval, self.total_steps) and \
            not frozen(self.step_index, self.freeze_step, self.truncation_interval)

    def step_bounds(self, bounds: engine.Bounds) -> engine.Bounds:
        """This step's rank rules: the tolerance rule on a truncation step, else every augmented direction up to
        ``r_max`` (``r_min = r_max``: the engine clamps to ``min(r_max, storage, r̂)``)."""
        if truncates(self.step_index, self.truncation_interval, self.total_steps):
            return bounds
        return engine.Bounds(tau=bounds.tau, r_min=bounds.r_max, r_max=bounds.r_max, absolute=bounds.absolute,
                             cap=bounds.cap)

    def rank_decision(self, groups: list[tuple[list[LowRankStorage], engine.Bounds]],
                      proposals: list[engine.Proposal], before: list[Tensor]) -> list[Tensor]:
        """The agreed ranks: ``before`` (the ranks of the step's start) when frozen; else, on a truncation step,
        the tau rule's or the budget's (:meth:`decide_ranks`), between truncations the augmented ranks; agreed on
        across processes."""
        if frozen(self.step_index, self.freeze_step, self.truncation_interval):
            return list(before)
        if truncates(self.step_index, self.truncation_interval, self.total_steps):
            return agree(self.decide_ranks(groups, proposals))
        return agree([p.ranks for p in proposals])

    def parallel_step(self, storages: list[LowRankStorage], lr: float | Tensor, also_check: list[Tensor] | None
                      ) -> Tensor:
        """The step's device work (what a CUDA graph captures): returns ``ok``."""
        adam = self.adam
        groups = self.groups(storages)
        gathered = [gather(part, with_moments=adam is not None, full=self.graph is not None) for part, _ in groups]
        # the stacked gradients hold every nonzero entry (past the step's widths they are zero)
        grads = [t for g in gathered for t in (g.core_grad, *g.k_grads) if t is not None]
        ok = all_finite(grads + list(also_check or []))
        proposals = [engine.propose(g.group, g.core_grad, g.k_grads, lr, self.step_bounds(bounds), adam,
                                    g.k_grad_rows) for g, (_, bounds) in zip(gathered, groups)]
        ranks = self.rank_decision(groups, proposals, [g.group.ranks for g in gathered])
        for (part, _), g, proposal, agreed in zip(groups, gathered, proposals, ranks):
            write(part, engine.apply(proposal, agreed), ok, g)
        self._taken += ok
        self._skipped += ~ok
        return ok

    def decide_ranks(self, groups: list[tuple[list[LowRankStorage], engine.Bounds]],
                     proposals: list[engine.Proposal]) -> list[Tensor]:
        """Every group's new ranks before the agreement: its tau rule's, or those of the adapters' parameter budget
        (``layers/budget.py``; the rule is rebuilt when the adapters, their scales or budgets change)."""
        key = tuple((id(s.core), s.scale, s.budget) for part, _ in groups for s in part)
        if self._budget_key != key:
            self._budget_key, self._budget_rule = key, budget_rule(groups, self.storages())
        if self._budget_rule is None:
            return [p.ranks for p in proposals]
        return self._budget_rule.ranks(groups, proposals)

    def publish(self, storages: list[LowRankStorage]) -> None:
        """Host rank mirrors (and the skip warning) from one non-blocking copy (``layers/rank_mirror.py``)."""
        rank_mirror.publish(storages, self._skipped, self._seen_device_skips)

    def _seen_device_skips(self, skipped: int) -> None:
        if skipped > self._seen_skips:
            self._seen_skips = skipped
            self.warn_skip()

    def skip_step(self, reason: str = "non-finite gradients") -> bool:
        """Skip this step for every adapter (nothing changes but the factor gradients are cleared); warns once."""
        self._skipped_on_host += 1
        self.warn_skip(reason)
        self.zero_grad()
        return False

    def warn_skip(self, reason: str = "non-finite gradients") -> None:
        if not self._warned_skip:
            warnings.warn(f"TDLRT: {reason}, skipping the step for every adapter (an fp16 loss-scale overflow does "
                          "this routinely; said once).", stacklevel=4)
            self._warned_skip = True


def all_finite(tensors: list[Tensor]) -> Tensor:
    """Whether every entry of every tensor is finite, as a 0-dim bool tensor: one fused max-norm (which does not
    overflow for finite entries, unlike the 2-norm) and no host read."""
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    return torch.isfinite(torch.stack(torch._foreach_norm(tensors, float("inf")))).all()


def agree(ranks: list[Tensor]) -> list[Tensor]:
    """Under torch.distributed every process takes process 0's rank decision (SVDs may differ in the last bit):
    one broadcast of all groups' ranks, on the device."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return ranks
    if torch.distributed.get_world_size() == 1:
        return ranks
    flat = torch.cat([r.reshape(-1) for r in ranks])
    torch.distributed.broadcast(flat, src=0)
    return [t.view_as(r) for t, r in zip(flat.split([r.numel() for r in ranks]), ranks)]
