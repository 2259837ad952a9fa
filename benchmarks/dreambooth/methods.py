"""The only place that knows the methods: the PEFT config, the optimizer, and how to count and describe each.

TDLRT trains with ``TDLRTOptimizer`` (the rank-adaptive step for the factors); LoRA, LoHa and LoKr (PEFT) with
AdamW on their trainable parameters, as diffusers' ``train_dreambooth_lora.py`` does (alpha = r: scale 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model
from torch import nn

import tdrlt_peft

from . import RunnerError

METHODS = ("tdlrt", "lora", "loha", "lokr")
SIZE_NAME = {"tdlrt": "tau", "lora": "r", "loha": "r", "lokr": "r"}
SIZE_FLAG = {"tdlrt": "tau", "lora": "lora_r", "loha": "loha_r", "lokr": "lokr_r"}
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv", "conv1", "conv2",
                   "conv_shortcut", "time_emb_proj", "ff.net.2")
ADAPTABLE = (nn.Linear, nn.Conv2d)


@dataclass
class Adapted:
    """A UNet with adapters, its optimizer, and how to report its size."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    count: Callable[[], int]            # trainable parameters (TDLRT: active, at the current ranks)
    ranks: Callable[[], dict]           # module -> rank (TDLRT: per adaptive mode)


def build(method: str, size: float, unet: nn.Module, targets: list[str], args) -> Adapted:
    """Wrap ``unet`` (consumed) with ``method`` at ``size`` (a rank, or TDLRT's tau)."""
    return _BUILDERS[method](size, unet, targets, args)


def _tdlrt(tau: float, unet, targets, args) -> Adapted:
    config = tdrlt_peft.TuckerAdapterConfig(r=args.tdlrt_r, r_max=args.tdlrt_r_max, tau=tau,
                                            scale=args.tdlrt_scale, target_modules=list(targets),
                                            truncation_interval=args.tdlrt_truncation_interval,
                                            core_optimizer=args.tdlrt_core_optimizer, **args.tdlrt_config)
    model = get_peft_model(unet, config)
    lr = args.tdlrt_learning_rate if args.tdlrt_learning_rate is not None else args.learning_rate
    optimizer = tdrlt_peft.TDLRTOptimizer(model, lr=lr, weight_decay=1e-2, total_steps=args.max_train_steps)
    return Adapted(model, optimizer, lambda: tdrlt_peft.count_active_parameters(model),
                   lambda: {_short(k): list(v) for k, v in tdrlt_peft.adapter_ranks(model).items()})


def _peft(config_for: Callable[[int, list[str]], object]):
    def builder(r: float, unet, targets, args) -> Adapted:
        model = get_peft_model(unet, config_for(int(r), list(targets)))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=1e-2)
        layers = {_short(n): int(r) for n, m in model.named_modules() if hasattr(m, "base_layer")}
        return Adapted(model, optimizer, lambda: sum(p.numel() for p in params), lambda: dict(layers))

    return builder


_BUILDERS = {
    "tdlrt": _tdlrt,
    "lora": _peft(lambda r, t: LoraConfig(r=r, lora_alpha=r, init_lora_weights="gaussian", target_modules=t)),
    "loha": _peft(lambda r, t: LoHaConfig(r=r, alpha=r, target_modules=t, init_weights=True)),
    "lokr": _peft(lambda r, t: LoKrConfig(r=r, alpha=r, target_modules=t, init_weights=True)),
}


def _short(name: str) -> str:
    return name.removeprefix("base_model.model.")


def resolve_targets(unet: nn.Module, requested: list[str] | None) -> list[str]:
    """The target names to use: every requested one must exist (else a RunnerError listing the names that do);
    the defaults are those present."""
    names = [n for n, m in unet.named_modules() if isinstance(m, ADAPTABLE)]

    def present(target: str) -> bool:
        return any(n == target or n.endswith("." + target) for n in names)

    if requested is None:
        targets = [t for t in DEFAULT_TARGETS if present(t)]
        if not targets:
            raise RunnerError(f"the UNet has none of the default target modules ({', '.join(DEFAULT_TARGETS)}); "
                              "name its modules with --target_modules")
        return targets
    missing = [t for t in requested if not present(t)]
    if missing:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in names} | {t for t in DEFAULT_TARGETS if present(t)})
        raise RunnerError(f"--target_modules {' '.join(missing)}: no such Linear/Conv2d module in the UNet. "
                          f"Module names it has (suffix match): {', '.join(suffixes)}")
    return list(requested)
