"""``TDLRTCallback``: runs the TDLRT step inside ``transformers.Trainer``.

Trainer order per optimizer step: gradient clipping -> ``on_pre_optimizer_step`` (the integrator step runs
here and clears the factor gradients) -> ``optimizer.step()`` (skips parameters whose ``.grad`` is None, so
the Trainer's optimizer never touches the factors) -> scheduler -> ``on_step_end``.
"""

from __future__ import annotations

import os
import sys

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..layers import rank_mirror
from ..layers.inventory import adapter_ranks, iter_storages, rank_statistics
from .checkpoint import mark_complete
from .integrator import DEFAULT_CORE_OPTIMIZER, TDLRTIntegrator


class TDLRTCallback(TrainerCallback):
    """Rank-adaptive TDLRT step every optimizer step, at the scheduler's current learning rate.

    Args:
        lr_factor: multiplies the learning rate of the step (on top of the config's ``core_lr_factor``).
        cuda_graph: capture the integrator step in a CUDA graph (``cuda_graph.py``: one CUDA device, one process).
        grouping: how the integrator groups adapters (``TDLRTIntegrator``; ``"auto"``: padded on a GPU, by shape
            on a CPU).
        log_ranks: add ``tdlrt/mean_rank``, ``tdlrt/min_rank``, ``tdlrt/max_rank`` and ``tdlrt/active_params``
            to every Trainer log (console, TensorBoard, W&B, ``state.log_history``).
    """

    def __init__(self, lr_factor: float = 1.0, log_ranks: bool = True, cuda_graph: bool = False,
                 grouping: str = "auto"):
        self.lr_factor = lr_factor
        self.cuda_graph = cuda_graph
        self.grouping = grouping
        self.log_ranks = log_ranks
        self.integrator: TDLRTIntegrator | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
            raise ValueError(
                "TDLRTCallback does not support DeepSpeed or FSDP: DeepSpeed steps inside backward and FSDP shards "
                "the factors, so the rank-adaptive step cannot see whole gradients. Use DDP (torchrun / "
                "accelerate launch without a DeepSpeed/FSDP config).")
        if model is None or not any(True for _ in iter_storages(model)):
            raise ValueError("TDLRTCallback: the model has no TDLRT adapters. Wrap it first with "
                             "`model = get_peft_model(model, TuckerAdapterConfig(...))`.")
        config = _active_config(model)
        self.integrator = TDLRTIntegrator(
            model, core_optimizer=getattr(config, "core_optimizer", DEFAULT_CORE_OPTIMIZER),
            betas=tuple(getattr(config, "adam_betas", (0.9, 0.999))), eps=getattr(config, "adam_eps", 1e-8),
            weight_decay=getattr(config, "core_weight_decay", 0.0),
            lr_factor=getattr(config, "core_lr_factor", 1.0) * self.lr_factor, cuda_graph=self.cuda_graph,
            grouping=self.grouping, truncation_interval=getattr(config, "truncation_interval", 1))
        max_steps = getattr(state, "max_steps", 0) or 0
        self.integrator.set_run_length(max_steps if max_steps > 0 else None,
                                       getattr(config, "rank_freeze_fraction", None))
        _move_to_front(self)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.integrator is not None and state is not None:
            self.integrator.step_index = state.global_step      # the rank schedule follows the Trainer (and resumes)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.integrator is None:
            raise RuntimeError("TDLRTCallback: on_train_begin was not called; pass the callback to the Trainer.")
        _unscale_fp16(optimizer)
        # an fp16 GradScaler skips this optimizer step (inf/NaN in any unscaled gradient): the adapters skip too,
        # decided on the device
        self.integrator.step(optimizer.param_groups[0]["lr"], also_check=_other_gradients(optimizer))

    def on_save(self, args, state, control, model=None, **kwargs):
        # the Trainer has written every file of checkpoint-N: mark it complete (see checkpoint.py)
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        ranks = {name.removeprefix("base_model.model."): list(r) for name, r in adapter_ranks(model).items()
                 } if model is not None else {}
        mark_complete(folder, state.global_step, is_main_process=args.should_save, ranks=ranks)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        rank_mirror.refresh()                 # a skip the host has not seen yet is said now
        # the live config's rank_pattern follows the ranks at the end (checkpoints record them on saving, see
        # peft_patches.py and TDLRTModel._get_adapter_state_dict); not every step: reading ranks is a host read
        update = getattr(getattr(model, "base_model", None), "update_rank_pattern", None)
        if callable(update):
            for name in getattr(model, "peft_config", {}):
                if getattr(model.peft_config[name], "peft_type", None) == "TDLRT":
                    update(name)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        rank_mirror.refresh()
        if self.log_ranks and logs is not None and model is not None:
            stats = rank_statistics(model)
            logs.update(stats)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(stats)


def _active_config(model):
    configs = getattr(model, "peft_config", None)
    if not configs:
        return None
    active = getattr(model, "active_adapter", None)
    return configs.get(active if isinstance(active, str) else next(iter(configs)))


def _other_gradients(optimizer) -> list:
    """The gradients of the optimizer's parameters (the fp16 scaler's skip test covers them all)."""
    return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def _unscale_fp16(optimizer) -> None:
    """fp16: make sure the factor gradients are unscaled before the step (transformers < 5.24 only unscales
    when max_grad_norm > 0). ``unscale_`` refuses a second call per step, which means it already happened."""
    scaler = getattr(optimizer, "scaler", None)
    inner = getattr(optimizer, "optimizer", None)
    if scaler is None or inner is None or not scaler.is_enabled():
        return
    try:
        scaler.unscale_(inner)
    except RuntimeError:
        pass


def _move_to_front(callback) -> None:
    """Put the callback first in the Trainer's CallbackHandler so its log entries reach the console and the
    reporting integrations (they run in list order). The handler is the caller of ``on_train_begin``; a new
    list is assigned so the loop over the old one is not disturbed."""
    frame = sys._getframe(2)
    handler = frame.f_locals.get("self") if frame is not None else None
    callbacks = getattr(handler, "callbacks", None)
    if isinstance(callbacks, list) and callback in callbacks:
        handler.callbacks = [callback] + [c for c in callbacks if c is not callback]
