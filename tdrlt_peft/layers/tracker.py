"""The tracker that catches adapter factors trained without the TDLRT integrator step.

The factors' ``.grad`` holds the TDLRT gradients (``G V``, ``G^T U``, ``U^T G V``), not ``dL/dU``: an ordinary
optimizer must never apply them. Each adapter's custom backward calls ``after_backward(factor)``; the integrator
calls ``after_step()`` (its ``zero_grad``); the adapter's training forward calls ``check(factor, where)``.

Misuse, reported at the next training forward with ``IntegratorNotRunError``: since the backward, without the
integrator's step,

- the factor changed (its ``_version``: any in-place update, e.g. ``torch.optim`` over the factors), or
- an optimizer holding the factor stepped while the factor had a gradient (a ``torch.optim.Optimizer`` step
  post-hook: also catches optimizers that write through ``.data``, which leaves ``_version`` alone).

Legitimate, never reported: gradients accumulated over micro-batches; gradients read and then cleared without a
step (gradient inspection, gradient checkpointing compared with a plain backward, PEFT's own tests); an optimizer
stepping other parameters before ``integrator.step``. The tracker cannot tell "inspected then cleared" from a plain
loop that forgets ``integrator.step`` and keeps the factors out of its optimizer: that loop trains the heads only.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook


class IntegratorNotRunError(RuntimeError):
    """The adapter factors were trained without the TDLRT integrator step."""


MISSING_STEP_MESSAGE = (
    "The TDLRT adapter factors of {where} were changed or their gradients were cleared without the TDLRT "
    "integrator step. Their .grad holds the geometry-aware K/L/core gradients, which an ordinary optimizer "
    "must not apply. With the Trainer add `callbacks=[TDLRTCallback()]`; in a plain PyTorch loop call "
    "`TDLRTIntegrator(model).step(lr)` after backward and keep the adapter factors out of your optimizer."
)

# id(factor) -> (factor, tracker), both weak, for every tracker with a backward not yet consumed by the integrator;
# the hook checks the factor's identity (an id can be reused once its tensor is gone)
_PENDING: dict[int, tuple[weakref.ref, weakref.ref]] = {}


@dataclass(eq=False)
class StepTracker:
    """Per adapter: set by the custom backward, cleared by the integrator's step, checked by the forward.

    ``pending``: a backward wrote TDLRT gradients that no integrator step consumed yet; ``version``: the factor's
    ``_version`` at that backward; ``stepped``: an optimizer holding the factor stepped since; ``factor_id``:
    ``id`` of the tracked factor (for the optimizer hook; an int, so the tracker pickles and deep-copies).
    """

    pending: bool = False
    version: int = -1
    stepped: bool = False
    factor_id: int = -1

    def after_backward(self, factor: Tensor) -> None:
        """A backward wrote the TDLRT gradients of ``factor``'s adapter (every micro-batch calls this)."""
        self.pending = True
        self.version = factor._version
        self.factor_id = id(factor)
        _PENDING[self.factor_id] = (weakref.ref(factor), weakref.ref(self))

    def after_step(self) -> None:
        """The integrator consumed (or deliberately discarded) the gradients: nothing is pending."""
        self.pending = False
        self.stepped = False
        entry = _PENDING.get(self.factor_id)
        if entry is not None and entry[1]() is self:
            del _PENDING[self.factor_id]

    def check(self, factor: Tensor, where: str) -> None:
        """At a training forward: raise ``IntegratorNotRunError`` if the factors were trained without the step."""
        if not self.pending:
            return
        if self.stepped or factor._version != self.version:
            self.after_step()
            raise IntegratorNotRunError(MISSING_STEP_MESSAGE.format(where=where))
        if factor.grad is None:
            # the gradients were cleared and the factor is unchanged: nothing was trained, nothing to report
            self.after_step()


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Global optimizer step post-hook: flag pending adapters whose factor this optimizer holds with a gradient."""
    if not _PENDING:
        return
    for key, (factor, tracker) in list(_PENDING.items()):   # forget adapters that are gone
        if factor() is None or tracker() is None:
            del _PENDING[key]
    for group in optimizer.param_groups:
        for p in group["params"]:
            entry = _PENDING.get(id(p))
            if entry is not None and entry[0]() is p and p.grad is not None:
                entry[1]().stepped = True


_HOOK = register_optimizer_step_post_hook(_after_optimizer_step)
