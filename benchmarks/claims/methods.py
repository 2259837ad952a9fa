"""The trainers compared: TDLRT (the library's integrator on a ``tdrlt_peft.layers.adapter.Linear`` adapter over a
frozen zero ``nn.Linear``, so the layer weight is exactly ``ΔW = U S V^T``), factorized gradient descent on LoRA factors
``W = B A`` (SGD or Adam) and full gradient descent on a dense ``W``. All in float64, full batch.

Every runner returns a ``Trajectory``: the loss, the relative error to ``W*`` and the rank at every iterate
(index k = after k steps), stopped early when the loss diverges.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from tdrlt_peft import TDLRTIntegrator
from tdrlt_peft.layers.adapter import Linear
from tdrlt_peft.layers.inventory import iter_storages
from tdrlt_peft.math.engine import RankBounds
from tdrlt_peft.math.tucker import tucker_to_tensor

from .problems import F64, MatrixProblem

# a run has diverged when its loss is non-finite or grew past this multiple of max(initial loss, 1)
DIVERGENCE_FACTOR = 1e8


@dataclass
class Trajectory:
    method: str
    lr: float
    losses: list[float] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)
    diverged: bool = False
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def record(self, problem: MatrixProblem, W: Tensor, rank: int) -> bool:
        """Append the metrics of ``W``; returns False once the run has diverged."""
        loss = problem.loss(W).item()
        self.losses.append(loss)
        self.errors.append(problem.relative_error(W) if math.isfinite(loss) else math.inf)
        self.ranks.append(rank)
        if not math.isfinite(loss) or loss > DIVERGENCE_FACTOR * max(self.losses[0], 1.0):
            self.diverged = True
        return not self.diverged

    def steps_to(self, tolerance: float) -> int | None:
        """First iterate with relative error <= tolerance (None: never)."""
        return next((k for k, e in enumerate(self.errors) if e <= tolerance), None)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------- TDLRT
def tdlrt_layer(W0: Tensor, rank_cap: int, tau: float = 0.0, r_min: int = 1, absolute_tau: bool = False) -> Linear:
    """An adapter whose ``ΔW`` is the truncated SVD of ``W0`` (at its numerical rank, at least ``r_min``, at most
    ``rank_cap``), over a frozen zero weight; ranks chosen by ``tau`` in ``[r_min, rank_cap]``.

    The paper's integrator augments a rank-r basis to 2r before truncating. The library's ``r_max`` is both the
    storage width and the rank cap (from rank r it can add only ``r_max - r`` directions), so the layer is built
    with ``r_max = 2 * rank_cap`` and the truncation's bounds are then set to ``[r_min, rank_cap]``.
    ``r_min = rank_cap`` (with ``tau = 0``) is the fixed-rank integrator.
    """
    layer = library_layer(W0, 2 * rank_cap, tau, r_min, absolute_tau, rank_cap)
    layer.tdlrt_bounds["default"] = RankBounds(tau=tau, r_min=r_min, r_max=rank_cap, absolute=absolute_tau)
    return layer


def library_layer(W0: Tensor, r_max: int, tau: float, r_min: int = 1, absolute_tau: bool = False,
                  rank_cap: int | None = None) -> Linear:
    """The library's own bounds: storage width = rank cap = ``r_max``; ``ΔW`` = the SVD of ``W0`` truncated to its
    numerical rank (within ``[r_min, rank_cap or r_max]``)."""
    out, inp = W0.shape
    base = nn.Linear(inp, out, bias=False).to(F64)
    with torch.no_grad():
        base.weight.zero_()
    base.weight.requires_grad_(False)
    P, s, Rt = torch.linalg.svd(W0, full_matrices=False)
    rank = min(max(r_min, int((s > 1e-14 * s[0]).sum())), rank_cap or r_max)
    layer = Linear(base, "default", r=rank, r_min=r_min, r_max=r_max, tau=tau, scale=1.0, absolute_tau=absolute_tau)
    layer_storage(layer).write(torch.diag(s[:rank]), [P[:, :rank], Rt[:rank].T], None)
    return layer


def layer_storage(layer: nn.Module):
    (storage,) = list(iter_storages(layer))
    return storage


def layer_weight(layer: nn.Module) -> Tensor:
    core, factors = layer_storage(layer).active()
    return tucker_to_tensor(core, factors).detach()


def run_tdlrt(problem: MatrixProblem, W0: Tensor, lr: float, steps: int, integrator: str = "parallel",
              core_optimizer: str = "sgd", layer: Linear | None = None,
              observe: Callable[[Tensor, Tensor, Tensor], None] | None = None, name: str | None = None,
              **layer_options) -> Trajectory:
    """``steps`` TDLRT steps (``integrator``: "parallel" = one pass, "bug" = the paper's two-pass step) on
    ``layer`` or on ``tdlrt_layer(W0, **layer_options)``.

    ``observe(W, U, V)`` is called at every iterate (for trajectory comparisons)."""
    layer = layer if layer is not None else tdlrt_layer(W0, **layer_options)
    storage = layer_storage(layer)   # a view: it follows every step
    step = TDLRTIntegrator(layer, core_optimizer=core_optimizer)
    trajectory = Trajectory(name or f"TDLRT-{integrator}-{core_optimizer}", lr)

    def closure() -> Tensor:
        loss = problem.output_loss(layer(problem.inputs))
        loss.backward()
        return loss

    start = time.perf_counter()
    for k in range(steps + 1):
        core, factors = storage.active()
        W = tucker_to_tensor(core, factors).detach()
        if observe is not None:
            _, (U, V) = storage.active()
            observe(W, U.detach(), V.detach())
        if not trajectory.record(problem, W, storage.ranks[0]) or k == steps:
            break
        if integrator == "bug":
            step.step(lr, closure)
        else:
            closure()
            step.step(lr)
        if step.num_skipped:
            trajectory.diverged = True   # a non-finite gradient: the loss blew up inside the step
            break
    trajectory.seconds = time.perf_counter() - start
    return trajectory


# ----------------------------------------------------------------------------------------- baselines
def run_factorized(problem: MatrixProblem, B0: Tensor, A0: Tensor, lr: float, steps: int, optimizer: str = "sgd",
                   name: str | None = None) -> Trajectory:
    """Factorized gradient descent on ``W = B A`` (the LoRA parametrisation), ``torch.optim.SGD`` or ``Adam``."""
    B, A = B0.clone().requires_grad_(True), A0.clone().requires_grad_(True)
    opt = torch.optim.SGD([B, A], lr=lr) if optimizer == "sgd" else torch.optim.Adam([B, A], lr=lr)
    trajectory = Trajectory(name or f"LoRA-{optimizer}", lr)
    start = time.perf_counter()
    for k in range(steps + 1):
        with torch.no_grad():
            W = B @ A
        if not trajectory.record(problem, W, B.shape[1]) or k == steps:
            break
        opt.zero_grad()
        problem.loss(B @ A).backward()
        opt.step()
    trajectory.seconds = time.perf_counter() - start
    return trajectory


def run_full(problem: MatrixProblem, W0: Tensor, lr: float, steps: int,
             observe: Callable[[Tensor], None] | None = None) -> Trajectory:
    """Full gradient descent on a dense ``W`` (no rank constraint): ``W <- W - λ dL/dW``."""
    W = W0.clone()
    trajectory = Trajectory("full GD", lr)
    start = time.perf_counter()
    for k in range(steps + 1):
        if observe is not None:
            observe(W)
        rank = int(torch.linalg.matrix_rank(W).item()) if k == steps else -1
        if not trajectory.record(problem, W, rank) or k == steps:
            break
        W = W - lr * problem.gradient(W)
    trajectory.seconds = time.perf_counter() - start
    return trajectory
