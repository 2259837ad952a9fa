"""``TDLRTOptimizer``: the TDLRT step as a ``torch.optim.Optimizer``, for code that expects one optimizer.

Usage (plain loop, ``accelerate``, LR schedulers, ``torch.amp.GradScaler``, ``Trainer(optimizers=...)``)::

    optimizer = TDLRTOptimizer(model, lr=1e-3, other_optimizer_cls=torch.optim.AdamW, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, ...)   # drives the adapters' lr too
    loss.backward(); optimizer.step(); scheduler.step(); optimizer.zero_grad()

Its ``param_groups`` are: group 0, every adapter factor (``"tdlrt": True``; its ``"lr"`` is the learning rate of
the rank-adaptive step), then the wrapped optimizer's own groups (the same dict objects, so a scheduler that
writes ``group["lr"]`` reaches it). All trainable parameters sit in ``param_groups``, so ``GradScaler.unscale_``,
``clip_grad_norm_`` over the groups and ``zero_grad`` reach the factors' gradients.

Mixed precision: like torch's fused Adam the optimizer sets ``_step_supports_amp_scaling``, so
``scaler.step(optimizer)`` always calls ``step``, handing over ``found_inf`` (then the step is skipped and counted
by the integrator) and ``grad_scale`` (gradients still scaled: ``step`` unscales them). The step therefore never
goes missing behind the integrator's back, whichever ``zero_grad`` follows (the Trainer calls
``model.zero_grad()``). As with fused Adam, ``accelerate`` then reports no skipped step on an overflow.

The adapters' Adam moments live in the model's buffers (saved with the adapter); ``state_dict`` holds the wrapped
optimizer's state, every group's hyperparameters and the integrator counters.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .integrator import DEFAULT_CORE_OPTIMIZER, TDLRTIntegrator

CONSUMED_MESSAGE = (
    "TDLRTOptimizer.step(): the adapter gradients of the last backward were consumed or cleared before this step "
    "(by TDLRTCallback / TDLRTTrainer, a TDLRTIntegrator.step, or model.zero_grad()). TDLRTOptimizer runs the TDLRT "
    "step itself: with Trainer(optimizers=(TDLRTOptimizer(...), scheduler)) use the plain transformers.Trainer "
    "and no TDLRTCallback; otherwise remove the extra integrator.")


class TDLRTOptimizer(torch.optim.Optimizer):
    """One optimizer for a model with TDLRT adapters: the integrator step for the factors, ``other_optimizer_cls``
    for every other trainable parameter (heads, biases, ``modules_to_save``).

    Args:
        model: the model with TDLRT adapters (``PeftModel``, or a model with ``add_adapter``-injected adapters).
        lr: learning rate of both (the adapters' ``lr`` is group 0's, multiplied by the config's
            ``core_lr_factor``); ``adapter_lr`` sets the adapters' own.
        other_optimizer_cls: optimizer class for the other trainable parameters, built as
            ``other_optimizer_cls(params, lr=lr, **other_kwargs)``.
        core_optimizer, betas, eps, core_weight_decay, lr_factor: the integrator's settings; None takes them from
            the model's active ``TuckerAdapterConfig`` (as ``TDLRTCallback`` does).
        total_steps: the run's optimizer steps, as ``TDLRTCallback`` reads them from the Trainer: the last step then
            truncates (``truncation_interval > 1`` ends the run truncated) and ``rank_freeze_fraction`` applies.
            Needed with ``rank_freeze_fraction``.
        **other_kwargs: passed to ``other_optimizer_cls`` (e.g. ``weight_decay``).

    A non-finite gradient anywhere skips the whole step (adapters and others), as ``GradScaler`` does.
    """

    _step_supports_amp_scaling = True   # GradScaler hands over found_inf / grad_scale instead of skipping step()

    def __init__(self, model: nn.Module, lr: float = 1e-3,
                 other_optimizer_cls: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW, *,
                 adapter_lr: float | None = None, core_optimizer: str | None = None,
                 betas: tuple[float, float] | None = None, eps: float | None = None,
                 core_weight_decay: float | None = None, lr_factor: float | None = None,
                 total_steps: int | None = None, **other_kwargs: Any):
        if not lr >= 0:
            raise ValueError(f"TDLRTOptimizer: lr must be >= 0, got {lr}.")
        if total_steps is not None and not (isinstance(total_steps, int) and total_steps > 0):
            raise ValueError(f"TDLRTOptimizer: total_steps must be a positive int (the run's optimizer steps), got "
                             f"{total_steps!r}.")
        config = _tdlrt_config(model)
        self.integrator = _integrator_for(config, model, core_optimizer, betas, eps, core_weight_decay, lr_factor)
        _plan_run(self.integrator, config, total_steps)
        storages = self.integrator.storages()
        factors = [p for s in storages for p in s.parameters() if p.requires_grad]
        others = self.integrator.other_trainable_parameters()
        self.other: torch.optim.Optimizer | None = None
        if others:
            self.other = other_optimizer_cls(others, lr=lr, **other_kwargs)
            if not isinstance(self.other, torch.optim.Optimizer):
                raise TypeError(f"TDLRTOptimizer: other_optimizer_cls built a {type(self.other).__name__}, "
                                "not a torch.optim.Optimizer.")
        adapter_group = {"params": factors, "lr": lr if adapter_lr is None else adapter_lr, "tdlrt": True}
        self._built = False
        self._counted_before = (0, 0)
        super().__init__([adapter_group, *self._other_groups()], {"lr": lr})
        self._built = True
        self._share_state_with_other()
        # backward writes the factor gradients (post-accumulate hooks count it); step() then expects them there
        self._backwards = _Counter()
        for s in storages:
            s.core.register_post_accumulate_grad_hook(self._backwards.tick)

    # ----------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """The integrator step at group 0's ``lr`` and the wrapped optimizer's step; None-gradients are skipped."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        backwards, self._backwards.count = self._backwards.count, 0
        had_grads = any(p.grad is not None for p in self.param_groups[0]["params"])
        if backwards and not had_grads:
            raise RuntimeError(CONSUMED_MESSAGE)
        found_inf = getattr(self, "found_inf", None)   # set by GradScaler.step (see module docstring)
        if found_inf is not None and float(found_inf) > 0:
            self.integrator.skip_step("non-finite gradients (the GradScaler skips this step)")
            return loss
        grad_scale = getattr(self, "grad_scale", None)
        if grad_scale is not None:   # GradScaler.step without a prior unscale_: the gradients are still scaled
            _scale_gradients(self._gradients(), 1.0 / float(grad_scale))
        others = self._gradients(start=1)
        if had_grads:   # a non-finite gradient of the others skips the adapters' step too, and the reverse
            taken = bool(self.integrator.step(float(self.param_groups[0]["lr"]), also_check=others))
        else:
            taken = _all_finite(others)
            if not taken:
                self.integrator.skip_step("non-finite gradients")
        if taken and self.other is not None:
            self.other.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear every gradient in ``param_groups`` (the factors' too; no TDLRT step is then pending)."""
        super().zero_grad(set_to_none=set_to_none)
        if self._backwards.count:    # a backward since the last step: its TDLRT gradients are discarded
            self.integrator.zero_grad()
        self._backwards.count = 0

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer``'s (the wrapped optimizer's state, every group) plus the integrator counters."""
        state = super().state_dict()
        state["tdlrt"] = {"num_steps": self.num_steps, "num_skipped": self.num_skipped,
                          "step_index": self.integrator.step_index}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        counters = state_dict.pop("tdlrt", None)
        super().load_state_dict(state_dict)    # new group dicts and a new state: share them with the wrapped one
        self._share_state_with_other()
        if counters is not None:   # counted on from the loaded values
            self._counted_before = (int(counters["num_steps"]) - self.integrator.num_steps,
                                    int(counters["num_skipped"]) - self.integrator.num_skipped)
            # the truncation schedule, the last step and the rank freeze go on from where the run was
            self.integrator.step_index = int(counters.get("step_index", self.integrator.step_index))

    @property
    def num_steps(self) -> int:
        """TDLRT steps taken (including those before a ``load_state_dict``)."""
        return self._counted_before[0] + self.integrator.num_steps

    @property
    def num_skipped(self) -> int:
        """Steps skipped for non-finite gradients (including those before a ``load_state_dict``)."""
        return self._counted_before[1] + self.integrator.num_skipped

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Groups added after construction go to the wrapped optimizer (and appear here as the same dict)."""
        if not getattr(self, "_built", True) or self.other is None:
            return super().add_param_group(param_group)
        self.other.add_param_group(param_group)
        super().add_param_group(self.other.param_groups[-1])

    # ----------------------------------------------------------------- helpers
    def _other_groups(self) -> list[dict[str, Any]]:
        return list(self.other.param_groups) if self.other is not None else []

    def _share_state_with_other(self) -> None:
        """The wrapped optimizer reads and writes our group dicts 1.. and our state (keyed by parameter)."""
        if self.other is None:
            return
        # its own __setstate__ restores defaults it needs (e.g. Adam's "step" tensors after a load)
        self.other.__setstate__({"state": self.state, "param_groups": self.param_groups[1:]})

    def _gradients(self, start: int = 0) -> list[Tensor]:
        return [p.grad for group in self.param_groups[start:] for p in group["params"] if p.grad is not None]


class _Counter:
    """Counts gradient arrivals (a post-accumulate-grad hook), without referencing the optimizer."""

    def __init__(self) -> None:
        self.count = 0

    def tick(self, _param: Tensor) -> None:
        self.count += 1


def _tdlrt_config(model: nn.Module):
    """The model's active TDLRT config (else its first TDLRT one); None when it has none."""
    configs = getattr(model, "peft_config", None) or {}
    active = getattr(model, "active_adapter", None)
    if callable(active):   # diffusers' ModelMixin.active_adapters is a method; transformers' a property
        active = None
    config = configs.get(active if isinstance(active, str) else next(iter(configs), None))
    if config is not None and getattr(config, "peft_type", None) != "TDLRT":
        config = next((c for c in configs.values() if getattr(c, "peft_type", None) == "TDLRT"), None)
    return config


def _plan_run(integrator: TDLRTIntegrator, config, total_steps: int | None) -> None:
    """The run length's consequences: a truncated last step and the rank freeze (as ``TDLRTCallback`` sets them)."""
    fraction = getattr(config, "rank_freeze_fraction", None)
    if total_steps is None:
        if fraction is not None:
            raise ValueError(f"TDLRTOptimizer: the config's rank_freeze_fraction={fraction} needs the run length: "
                             "pass TDLRTOptimizer(..., total_steps=<optimizer steps of the run>).")
        if getattr(config, "truncation_interval", 1) > 1:
            warnings.warn("TDLRTOptimizer: truncation_interval > 1 without total_steps: the run may end between two "
                          "truncations, with every augmented direction kept. Pass total_steps=<optimizer steps> so "
                          "the last step truncates.", stacklevel=3)
        return
    integrator.set_run_length(total_steps, fraction)


def _integrator_for(config, model: nn.Module, core_optimizer, betas, eps, weight_decay, lr_factor
                    ) -> TDLRTIntegrator:
    """The integrator with the explicit settings, else those of the TDLRT ``config``."""

    def pick(value, name, default):
        return value if value is not None else getattr(config, name, default)

    return TDLRTIntegrator(
        model, core_optimizer=pick(core_optimizer, "core_optimizer", DEFAULT_CORE_OPTIMIZER),
        betas=tuple(pick(betas, "adam_betas", (0.9, 0.999))), eps=pick(eps, "adam_eps", 1e-8),
        weight_decay=pick(weight_decay, "core_weight_decay", 0.0),
        lr_factor=pick(lr_factor, "core_lr_factor", 1.0),
        truncation_interval=getattr(config, "truncation_interval", 1))


def _all_finite(tensors: list[Tensor]) -> bool:
    """Whether every entry of every tensor is finite (the max-norm, which no finite entry overflows)."""
    if not tensors:
        return True
    norms = torch._foreach_norm(tensors, float("inf"))
    return bool(torch.isfinite(torch.stack([n.float().to(norms[0].device) for n in norms])).all())


def _scale_gradients(grads: list[Tensor], factor: float) -> None:
    """``g *= factor`` in place, one fused op per (device, dtype)."""
    groups: dict[tuple, list[Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    for same in groups.values():
        torch._foreach_mul_(same, factor)
