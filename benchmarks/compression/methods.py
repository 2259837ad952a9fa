"""The compared methods, and ``build``: the only place that knows how each method makes and trains a model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from tdrlt_peft import TDLRTIntegrator, factorize
from tdrlt_peft.layers.factorized import FactorizedConv, FactorizedLayer

from .models import NETWORKS, compressed_convs

Kind = Literal["dense", "tdlrt", "tucker-gd", "matrix"]
LABELS = {"dense": "dense", "tdlrt": "TDLRT Tucker", "tucker-gd": "Tucker fixed-rank GD", "matrix": "matrix DLRT"}


@dataclass(frozen=True)
class Method:
    """``tucker-gd`` trains the final ranks of the TDLRT run with the same ``tau`` (and seed) at fixed rank.
    ``freeze``: a TDLRT run whose ranks are frozen after this fraction of the steps (``rank_freeze_fraction``,
    the ablation of ranks that keep adapting); None: free ranks. ``budget``: a TDLRT run in budget mode,
    ``factorize(target_params=budget)`` instead of ``tau``."""

    kind: Kind
    tau: float | None = None
    freeze: float | None = None
    budget: int | None = None

    @property
    def label(self) -> str:
        if self.kind == "dense":
            return LABELS["dense"]
        if self.budget is not None:
            return f"{LABELS[self.kind]} (budget {self.budget})"
        suffix = f"ranks of tau={self.tau:g}" if self.kind == "tucker-gd" else f"tau={self.tau:g}"
        if self.freeze is not None:
            suffix += f", ranks frozen at {100 * self.freeze:g} %"
        return f"{LABELS[self.kind]} ({suffix})"


@dataclass
class Built:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    integrator: TDLRTIntegrator | None   # runs the TDLRT step on the factorized convolutions


@dataclass(frozen=True)
class LowRankSettings:
    r_init: int = 32      # initial rank per channel mode (random init), clamped to the channels
    r_max: int = 64       # storage width: ranks may grow up to this
    lr: float = 3e-3      # one learning rate for every method (Adam; the TDLRT core uses the same Adam rule)
    core_lr_factor: float = 1.0   # the TDLRT / DLRT step uses lr * core_lr_factor
    core_optimizer: str = "adam"  # of the TDLRT / DLRT core: "adam" or "sgd"
    truncation_interval: int = 1  # the TDLRT / DLRT tau rule every P steps (and at the last); in between: no cut


def build(method: Method, network: str, seed: int, settings: LowRankSettings,
          ranks: dict[str, list[int]] | None = None) -> Built:
    """A freshly initialised ``network`` for ``method`` (``ranks``: the fixed ranks of ``tucker-gd``)."""
    torch.manual_seed(seed)
    model = NETWORKS[network]()
    targets = compressed_convs(model)
    integrator = None
    if method.kind == "dense":
        parameters = list(model.parameters())
    elif method.kind == "tucker-gd":
        if ranks is None:
            raise ValueError("tucker-gd needs the ranks of the TDLRT run with the same tau and seed.")
        factorize(model, target_modules=targets, r=ranks, train_with="optimizer")
        parameters = list(model.parameters())
    else:
        layout = "tucker" if method.kind == "tdlrt" else "matrix"
        # budget mode: the budget replaces the tau rule of every layer (tau unused)
        factorize(model, target_modules=targets, r=settings.r_init, r_max=settings.r_max,
                  tau=0.0 if method.tau is None else method.tau, layout=layout, target_params=method.budget)
        integrator = TDLRTIntegrator(model, core_optimizer=settings.core_optimizer, lr_factor=settings.core_lr_factor,
                                     truncation_interval=settings.truncation_interval)
        parameters = integrator.other_trainable_parameters()
    return Built(model, torch.optim.Adam(parameters, lr=settings.lr), integrator)


def conv_ranks(model: nn.Module) -> dict[str, list[int]]:
    """Channel ranks of every factorized convolution (module name -> [r_out, r_in], or [r] for a matrix), read
    from the rank buffers: right after a step a layer's ``ranks`` are only its slicing widths, a bound (up to 2r)
    until its next forward."""
    return {name: m.storage().host_ranks()[:1 if m.matrix else 2]
            for name, m in model.named_modules() if isinstance(m, FactorizedLayer)}


def conv_parameter_count(model: nn.Module) -> int:
    """Convolution weights as stored by the method: dense kernels at full size, factorized ones at their
    active factor sizes (``sum n_i r_i + prod r_i``; matrix ``(out + in k^2) r + r^2``); biases excluded."""
    count = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            count += m.weight.numel()
        elif isinstance(m, FactorizedConv):
            count += m.storage().num_active_parameters()
    return count
