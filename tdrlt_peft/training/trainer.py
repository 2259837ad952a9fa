"""``TDLRTTrainer``: a ``transformers.Trainer`` that runs the TDLRT step, parallel (one pass) or BUG (two passes).

``integrator="parallel"`` is the Trainer plus ``TDLRTCallback``. ``integrator="bug"`` runs the paper's own
step (``bug.py``): the Trainer's backward is the first pass; at ``on_pre_optimizer_step`` the micro-batches of
the optimizer step are replayed through ``Trainer.training_step`` for the second pass, with

* gradient accumulation: every micro-batch of the step is replayed with the same loss scaling, so the second
  pass sums the same micro-batch gradients as the first (their inputs are kept until the step);
* dropout: the random state in front of each micro-batch is restored, so the replay sees the same masks;
* gradient clipping (``max_grad_norm > 0``): the Trainer clipped the first pass; the second pass's core
  gradient is scaled by the same coefficient ``min(1, max_norm / (norm + 1e-6))``;
* DDP: the replay runs outside ``no_sync``, so every replayed micro-batch all-reduces (correct, more traffic);
* fp16 (a loss scaler) is refused: use bf16 or float32.

The loss the Trainer logs is the first pass's.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from transformers import Trainer

from ..layers.inventory import iter_storages
from .callback import TDLRTCallback
from .checkpoint import last_complete_checkpoint

INTEGRATORS = ("parallel", "bug")


class TDLRTTrainer(Trainer):
    """``Trainer`` with the TDLRT step built in (do not also pass a ``TDLRTCallback``).

    Args:
        integrator: ``"parallel"`` (one forward/backward per step) or ``"bug"`` (the paper's basis-update &
            Galerkin step, two forward/backward passes per step on the same batch).
        lr_factor, log_ranks: as in ``TDLRTCallback``.
        *args, **kwargs: ``transformers.Trainer``'s.
    """

    def __init__(self, *args: Any, integrator: Literal["parallel", "bug"] = "parallel", lr_factor: float = 1.0,
                 log_ranks: bool = True, **kwargs: Any) -> None:
        if integrator not in INTEGRATORS:
            raise ValueError(f"TDLRTTrainer: integrator must be one of {INTEGRATORS}, got {integrator!r}.")
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if any(c is TDLRTCallback or isinstance(c, TDLRTCallback) for c in callbacks):
            raise ValueError("TDLRTTrainer runs the TDLRT step itself: remove TDLRTCallback from callbacks.")
        self.tdlrt_integrator = integrator
        self._micro_batches: list[tuple[Any, dict, Any, Any]] = []
        self._replaying = False
        self._clip_coefficient = 1.0
        callback_cls = BUGCallback if integrator == "bug" else TDLRTCallback
        self.tdlrt_callback = callback_cls(lr_factor=lr_factor, log_ranks=log_ranks)
        super().__init__(*args, callbacks=[*callbacks, self.tdlrt_callback], **kwargs)
        if integrator == "bug":
            self.tdlrt_callback.trainer = self
            if self.args.fp16:
                raise ValueError("TDLRTTrainer(integrator='bug') does not support fp16 (its loss scaler would "
                                 "scale the second pass differently): use bf16 or float32.")

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """``Trainer.train``, except that ``resume_from_checkpoint=True`` takes the newest *complete* checkpoint
        (``last_complete_checkpoint``): transformers takes the newest folder, also one a crash left half-written."""
        if resume_from_checkpoint is True:
            path = last_complete_checkpoint(self.args.output_dir)
            if path is None:
                raise ValueError(f"resume_from_checkpoint=True, but {self.args.output_dir} holds no complete "
                                 "checkpoint (checkpoint-N with its TDLRT completion marker); start without resuming.")
            resume_from_checkpoint = path
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.tdlrt_integrator == "bug" and not self._replaying:
            self._micro_batches.append((model, inputs, num_items_in_batch, _rng_state()))
        return super().training_step(model, inputs, num_items_in_batch)

    def _clip_grad_norm(self, model):
        norm = super()._clip_grad_norm(model)
        # torch.nn.utils.clip_grad_norm_ multiplies by min(1, max_norm / (norm + 1e-6))
        self._clip_coefficient = min(1.0, self.args.max_grad_norm / (float(norm) + 1e-6))
        return norm

    def replay_second_pass(self) -> torch.Tensor:
        """The BUG closure: forward/backward of every recorded micro-batch again, same scaling and random state."""
        if not self._micro_batches:
            raise RuntimeError("TDLRTTrainer: no micro-batch was recorded for this optimizer step.")
        state = _rng_state()
        self._replaying = True
        try:
            loss = torch.zeros(())
            for model, inputs, num_items_in_batch, rng in self._micro_batches:
                _set_rng_state(rng)
                loss = loss + super().training_step(model, inputs, num_items_in_batch).float().cpu()
        finally:
            self._replaying = False
            _set_rng_state(state)
        if self._clip_coefficient != 1.0:
            for s in iter_storages(self.model):
                if s.core.grad is not None:
                    s.core.grad.mul_(self._clip_coefficient)
        return loss

    def end_bug_step(self) -> None:
        self._micro_batches.clear()
        self._clip_coefficient = 1.0


class BUGCallback(TDLRTCallback):
    """``TDLRTCallback`` whose step is the two-pass BUG step, with ``TDLRTTrainer`` replaying the batch."""

    trainer: TDLRTTrainer | None = None

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.integrator is None or self.trainer is None:
            raise RuntimeError("BUGCallback runs inside TDLRTTrainer(integrator='bug') only.")
        try:
            self.integrator.step(optimizer.param_groups[0]["lr"], closure=self.trainer.replay_second_pass)
        finally:
            self.trainer.end_bug_step()


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
