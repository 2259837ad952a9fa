"""``TuckerAdapterConfig``: the PEFT config of rank-adaptive TDLRT adapters."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

from peft.config import PeftConfig
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from ..layers.conv import CONV_LAYOUTS
from ..math.engine import CORE_OPTIMIZERS, DEFAULT_CORE_OPTIMIZER
from .registration import PEFT_TYPE_NAME, peft_type

# All linear layers of attention and feed-forward inside the encoder blocks (not the pooler / classifier),
# as in the TDLRT / AdaLoRA / GeoLoRA DeBERTa-v3 experiments. Other architectures: PEFT's LoRA defaults.
_ENCODER_LINEARS = {
    "deberta-v2": r".*encoder\.layer\.\d+\..*(query_proj|key_proj|value_proj|dense)$",
    "deberta": r".*encoder\.layer\.\d+\..*(in_proj|dense)$",
    "bert": r".*encoder\.layer\.\d+\..*(query|key|value|dense)$",
    "roberta": r".*encoder\.layer\.\d+\..*(query|key|value|dense)$",
    "xlm-roberta": r".*encoder\.layer\.\d+\..*(query|key|value|dense)$",
    "distilbert": r".*transformer\.layer\.\d+\..*(q_lin|k_lin|v_lin|out_lin|lin1|lin2)$",
}
TRANSFORMERS_MODELS_TO_TDLRT_TARGET_MODULES_MAPPING = {**TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
                                                        **_ENCODER_LINEARS}


@dataclass
class TuckerAdapterConfig(PeftConfig):
    """Configuration of TDLRT adapters: ``W0 + scale * ΔW`` with a rank-adaptive low-rank (Tucker) ``ΔW``.

    Matrix adapters ``U S V^T`` for ``nn.Linear``, Tucker adapters for convolutions. The rank of every layer
    is chosen by the tolerance ``tau`` within ``[r_min, r_max]`` at every optimizer step (run by
    ``TDLRTCallback`` / ``TDLRTIntegrator``). Fields (this list is generated from the fields' help):
    """

    r: int = field(default=8, metadata={"help": "Initial rank of every adapter (per adaptive mode)."})
    r_min: int = field(default=1, metadata={"help": "Smallest rank the truncation may choose (>= 1)."})
    r_max: int = field(default=32, metadata={
        "help": "Largest rank; factors are stored at this width. From rank r a step can add at most "
                "r_max - r directions, so choose about twice the rank you expect."})
    tau: float = field(default=0.4, metadata={
        "help": "Truncation tolerance in [0, 1): drop the smallest singular values whose norm is at most "
                "tau * ||core||_F (relative), or at most tau when absolute_tau. 0 keeps the exact rank. The "
                "default was chosen on a tuning split (benchmarks/glue/DEFAULTS.md)."})
    absolute_tau: bool = field(default=False, metadata={"help": "Use tau as an absolute threshold."})
    target_params: int | None = field(default=None, metadata={
        "help": "Parameter budget: the total active adapter parameters (sum over adapters of sum_i n_i r_i + "
                "prod_i r_i; heads and modules_to_save not counted) to train with. Every step then keeps the "
                "directions with the largest singular values of scale * ΔW over the whole model that fit in it "
                "(tdrlt_peft/math/budget.py), instead of each layer's tau rule. None: the tau rule."})
    truncation_interval: int = field(default=1, metadata={
        "help": "Apply the tau rule every this many optimizer steps (and at the last step); the steps in between "
                "keep every augmented direction up to r_max, so a new direction gets first-order updates before "
                "it is judged. 1: every step. Ranks then keep adapting late in training (benchmarks/glue/RANKS.md)."})
    rank_freeze_fraction: float | None = field(default=None, metadata={
        "help": "Freeze every rank after this fraction in (0, 1] of the optimizer steps (TDLRTCallback reads the run "
                "length from the Trainer; TDLRTOptimizer needs total_steps=N). Bases and core still train. None: "
                "ranks adapt until the end."})
    scale: float = field(default=2.0, metadata={
        "help": "Constant output scale s of s * ΔW (never rank dependent, so a rank change never makes the "
                "output jump). With the Adam core it multiplies the adapters' step size (about lr * scale)."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the adapter input."})
    core_optimizer: Literal["adam", "adam_normalized", "adam_factors", "sgd"] = field(
        default=DEFAULT_CORE_OPTIMIZER, metadata={
            "help": "Update of the core in the augmented basis: 'adam_factors' (Adam, the kept directions moved "
                    "along the factors' Adam directions, as LoRA's B and A are; the two-pass step takes 'adam''s), "
                    "'adam' (Adam on the core, state transported across basis changes: each core entry moves by "
                    "about lr), 'adam_normalized' ('adam' with its step divided by sqrt(prod_i r̂_i), the square "
                    "root of the augmented core's size: the step then has a Frobenius norm of about lr at every "
                    "rank) or 'sgd' (the exact projected-gradient step of the theory)."})
    core_lr_factor: float = field(default=1.0, metadata={
        "help": "The integrator step uses the Trainer's current learning rate times this factor."})
    adam_betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "Adam betas of the core."})
    adam_eps: float = field(default=1e-8, metadata={"help": "Adam epsilon of the core."})
    core_weight_decay: float = field(default=0.0, metadata={"help": "Decoupled weight decay of the core."})
    factorize_spatial: bool = field(default=False, metadata={
        "help": "Convolutions: also factorize (and rank-adapt) the kernel's spatial modes."})
    conv_layout: Literal["tucker", "matrix"] = field(default="tucker", metadata={
        "help": "Convolutions: 'tucker' (a Tucker tensor C x_1 U_1 x_2 U_2 of the kernel, a rank per channel mode) "
                "or 'matrix' (U S V^T of the kernel's (out, in * prod k) reshape, one rank, LoRA's layout on "
                "convolutions; not with factorize_spatial)."})
    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "Module names (suffix match) or a regex of the modules to adapt. Default: all attention and "
                "feed-forward linears for DeBERTa-v2/v3, BERT, RoBERTa; PEFT's LoRA defaults otherwise."})
    exclude_modules: list[str] | str | None = field(default=None, metadata={
        "help": "Module names or a regex of modules not to adapt."})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={
        "help": "Only adapt the layers with these indices."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={
        "help": "Name of the nn.ModuleList that layers_to_transform indexes (e.g. 'layer')."})
    rank_pattern: dict = field(default_factory=dict, metadata={
        "help": "Module name (or regex) -> rank. Filled with the current ranks during training and saved, so a "
                "saved adapter rebuilds at its trained ranks."})
    modules_to_save: list[str] | None = field(default=None, metadata={
        "help": "Modules besides the adapters to train and save (e.g. the classifier head)."})
    bias: Literal["none", "all"] = field(default="none", metadata={
        "help": "Which biases to train: 'none' or 'all' (saved with the adapter)."})
    init_weights: bool = field(default=True, metadata={
        "help": "Initialise with a zero core (ΔW = 0). Always True for adapters."})
    target_parameters: list[str] | None = field(default=None, metadata={
        "help": "Not supported by TDLRT (PEFT field for nn.Parameter targets); must be None."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = peft_type()
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self.adam_betas = tuple(self.adam_betas)
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, valid: str) -> ValueError:
            return ValueError(f"TuckerAdapterConfig.{name}={getattr(self, name)!r} is invalid: {valid}.")

        if not isinstance(self.r_min, int) or self.r_min < 1:
            raise bad("r_min", "it must be an integer >= 1")
        if not isinstance(self.r_max, int) or self.r_max < self.r_min:
            raise bad("r_max", f"it must be an integer >= r_min ({self.r_min})")
        if not isinstance(self.r, int) or not self.r_min <= self.r <= self.r_max:
            raise bad("r", f"the initial rank must satisfy r_min ({self.r_min}) <= r <= r_max ({self.r_max})")
        if self.absolute_tau:
            if not self.tau >= 0:
                raise bad("tau", "an absolute tolerance must be >= 0")
        elif not 0 <= self.tau < 1:
            raise bad("tau", "a relative tolerance must satisfy 0 <= tau < 1")
        if self.target_params is not None and (isinstance(self.target_params, bool)
                                               or not isinstance(self.target_params, int) or self.target_params < 1):
            raise bad("target_params", "a budget is a positive integer number of parameters (None: the tau rule)")
        if not isinstance(self.truncation_interval, int) or self.truncation_interval < 1:
            raise bad("truncation_interval", "it must be an integer >= 1")
        if self.rank_freeze_fraction is not None and not 0 < self.rank_freeze_fraction <= 1:
            raise bad("rank_freeze_fraction", "it must be None or satisfy 0 < fraction <= 1")
        if not self.scale > 0:
            raise bad("scale", "it must be > 0")
        if not 0 <= self.dropout < 1:
            raise bad("dropout", "it must satisfy 0 <= dropout < 1")
        if self.core_optimizer not in CORE_OPTIMIZERS:
            raise bad("core_optimizer", "use one of " + ", ".join(repr(name) for name in CORE_OPTIMIZERS))
        if not self.core_lr_factor > 0:
            raise bad("core_lr_factor", "it must be > 0")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise bad("adam_betas", "two values in [0, 1)")
        if not self.adam_eps > 0:
            raise bad("adam_eps", "it must be > 0")
        if self.core_weight_decay < 0:
            raise bad("core_weight_decay", "it must be >= 0")
        if self.conv_layout not in CONV_LAYOUTS:
            raise bad("conv_layout", "use " + " or ".join(repr(name) for name in CONV_LAYOUTS))
        if self.conv_layout == "matrix" and self.factorize_spatial:
            raise bad("conv_layout", "the matrix layout keeps the spatial modes in the matrix; it cannot be "
                      "combined with factorize_spatial=True (set one of them)")
        if self.bias not in ("none", "all"):
            raise bad("bias", "use 'none' or 'all'")
        if self.target_parameters:
            raise bad("target_parameters", "TDLRT adapts modules (nn.Linear, convolutions), use target_modules")
        if self.layers_pattern and self.layers_to_transform is None:
            raise bad("layers_pattern", "it only applies together with layers_to_transform")
        if not self.init_weights:
            raise bad("init_weights", "TDLRT adapters start from ΔW = 0 (a zero core); leave it True")
        for key, value in self.rank_pattern.items():
            ranks = value if isinstance(value, (list, tuple)) else [value]
            if not all(isinstance(r, int) and r >= 1 for r in ranks):
                raise ValueError(f"TuckerAdapterConfig.rank_pattern[{key!r}]={value!r} is invalid: ranks are "
                                 "positive integers.")


TuckerAdapterConfig.__doc__ += "\n" + "\n".join(
    f"    {f.name}: {f.metadata['help']}" for f in fields(TuckerAdapterConfig) if "help" in f.metadata
    and f.name in TuckerAdapterConfig.__annotations__)

__all__ = ["TuckerAdapterConfig", "TRANSFORMERS_MODELS_TO_TDLRT_TARGET_MODULES_MAPPING", "PEFT_TYPE_NAME"]
