"""``TDLRTIntegrator``: the rank-adaptive step for every adapter of a model, for any training loop.

Usage in a plain PyTorch loop::

    integrator = TDLRTIntegrator(model)              # finds every TDLRT adapter / factorized layer
    optimizer = torch.optim.AdamW(integrator.other_trainable_parameters(), lr=lr)
    loss.backward()
    integrator.step(lr)                              # augment, update the core, truncate; clears factor grads
    optimizer.step(); optimizer.zero_grad()

The step is atomic: all proposals are computed before anything is written, a non-finite gradient skips the
step for every adapter (with one warning), and under ``torch.distributed`` the ranks chosen on process 0
are broadcast so every process truncates identically.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from ..layers.inventory import iter_storages
from ..layers.storage import LowRankStorage
from ..math.batched import BatchedStep
from ..math.geometry import compute_dtype
from ..math.step import apply, propose
from ..math.threads import single_threaded_linalg

CORE_OPTIMIZERS = ("adam", "sgd")


class TDLRTIntegrator:
    """Runs the parallel rank-adaptive step (``docs/algorithm.md``) on every adapter of ``model``.

    Args:
        model: any module containing TDLRT adapter layers or factorized layers (PeftModel or bare model).
        core_optimizer: ``"adam"`` (moments owned here, stored in the layers' buffers and transported across
            basis changes, see ``adam.py``) or ``"sgd"`` (the exact projected-gradient step of the theory).
        betas, eps, weight_decay: Adam settings for the core (decoupled weight decay).
        lr_factor: the step uses ``lr * lr_factor``.
        batched: step adapters of equal shapes and ranks together, one batched QR/SVD per group (``batched.py``;
            same result as the per-adapter path, which ``batched=False`` selects).
    """

    def __init__(self, model: nn.Module, core_optimizer: Literal["adam", "sgd"] = "adam",
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 lr_factor: float = 1.0, batched: bool = True):
        if core_optimizer not in CORE_OPTIMIZERS:
            raise ValueError(f"core_optimizer must be one of {CORE_OPTIMIZERS}, got {core_optimizer!r}.")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"betas must lie in [0, 1), got {betas}.")
        self.model = model
        self.core_optimizer = core_optimizer
        self.adam = {"betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        self.lr_factor = lr_factor
        self.batched = batched
        self.num_steps = 0
        self.num_skipped = 0
        self._warned_skip = False
        if not any(True for _ in iter_storages(model)):
            raise ValueError(
                "TDLRTIntegrator found no TDLRT adapters in the model: wrap it with "
                "`get_peft_model(model, TuckerAdapterConfig(...))` or use tdrlt_peft factorized layers.")

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

    @torch.no_grad()
    def step(self, lr: float, closure: Callable[[], object] | None = None) -> bool:
        """One rank-adaptive step at learning rate ``lr * lr_factor`` for every adapter with gradients.

        With a ``closure`` (recomputes the loss on the same batch and calls backward) it is the paper's two-pass
        BUG step instead of the parallel one, see ``bug.py``. Returns False (and changes nothing but clearing
        the factor gradients) when a gradient is non-finite.
        """
        if closure is not None:
            from .bug import bug_step

            return bug_step(self, lr, closure)
        every_storage = list(iter_storages(self.model))
        storages = [s for s in every_storage if s.core.grad is not None]
        if not storages:
            self.zero_grad(every_storage)
            return False
        # all of the step on one thread on CPU, writes and checks included: every tensor in it is small
        with single_threaded_linalg(storages[0].core.device):
            try:
                return self._parallel_step(storages, float(lr) * self.lr_factor)
            finally:
                self.zero_grad(every_storage)

    def _parallel_step(self, storages: list[LowRankStorage], lr: float) -> bool:
        if not _all_finite([p.grad for s in storages for p in s.parameters() if p.grad is not None]):
            return self.skip_step()
        if self.batched:
            adam = self.adam if self.core_optimizer == "adam" else None
            batch = BatchedStep(storages, lr, adam, fallback=lambda s: self._propose(s, lr))
            batch.apply(_agree(batch.ranks))
            batch.write()
        else:
            proposals = [self._propose(s, lr) for s in storages]
            ranks = _agree([p.ranks for p in proposals])
            results = [apply(p, k) for p, k in zip(proposals, ranks)]
            for s, (core, factors, moments) in zip(storages, results):
                s.write(core, factors, moments)
        self.num_steps += 1
        return True

    def skip_step(self, reason: str = "non-finite adapter gradients") -> bool:
        """Skip this step for every adapter (nothing changes but the factor gradients are cleared); warns once."""
        self.num_skipped += 1
        if not self._warned_skip:
            warnings.warn(f"TDLRT: {reason}, skipping the step for every adapter (an fp16 loss-scale overflow does "
                          "this routinely; said once).", stacklevel=3)
            self._warned_skip = True
        self.zero_grad()
        return False

    def _propose(self, s: LowRankStorage, lr: float):
        dtype = compute_dtype(s.core.dtype)
        core, factors = s.active()
        ranks = s.ranks
        core_grad = s.core.grad[tuple(slice(0, r) for r in ranks)].to(dtype)
        k_grads = [None if U is None else U.grad[:, :r].to(dtype) for U, r in zip(s.factors, ranks)]
        moments = s.active_moments(dtype) if self.core_optimizer == "adam" else None
        return propose(core.to(dtype), [None if U is None else U.to(dtype) for U in factors], core_grad,
                       k_grads, lr, s.bounds, matrix=s.matrix, storage_ranks=s.storage_ranks(),
                       moments=moments, adam=self.adam if moments is not None else None)


def _all_finite(tensors: list[Tensor]) -> bool:
    if not tensors:
        return True
    # one fused op and one host sync for all adapters: ||t||_2 is finite only if every entry is
    if bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all()):
        return True
    # the 2-norm also overflows for finite entries above ~1e19 (float32): decide entry-wise
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _agree(ranks: list[list[int]]) -> list[list[int]]:
    """Under torch.distributed, every process takes process 0's rank decision (SVDs may differ in the last bit)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return ranks
    if torch.distributed.get_world_size() == 1:
        return ranks
    flat = torch.tensor([r for rs in ranks for r in rs], dtype=torch.int64)
    if torch.distributed.get_backend() == "nccl":
        flat = flat.cuda()
    torch.distributed.broadcast(flat, src=0)
    values = iter(flat.tolist())
    return [[next(values) for _ in rs] for rs in ranks]
