"""``TDLRTModel``: the PEFT tuner that injects TDLRT adapter layers (thin: dispatch and config plumbing)."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner
from peft.utils.other import get_pattern_key
from torch import nn

from ..layers.adapter import Linear, TDLRTLayer
from ..layers.budget import check_budget, fit_initial_ranks
from ..layers.conv import CONV_LAYER_TYPES
from ..layers.inventory import adapter_ranks, iter_storages
from ..layers.storage import ParameterBudget
from .config import TRANSFORMERS_MODELS_TO_TDLRT_TARGET_MODULES_MAPPING, TuckerAdapterConfig
from .load_checks import check_saved_adapter
from .registration import PREFIX

# layer type -> adapter class (Tucker adapters of convolutions: conv.py)
LAYER_TYPES: dict[type[nn.Module], type[TDLRTLayer]] = {nn.Linear: Linear, **CONV_LAYER_TYPES}


class TDLRTModel(BaseTuner):
    """Injects rank-adaptive TDLRT adapters into the modules named by ``TuckerAdapterConfig``."""

    prefix: str = PREFIX
    tuner_layer_cls = TDLRTLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_TDLRT_TARGET_MODULES_MAPPING

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        # all or nothing: a target that cannot be adapted (unsupported type, grouped convolution) raises after the
        # targets before it were replaced; put the original modules back so that the user's model is unchanged
        originals = list(model.named_modules())
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
            attach_budget(model, adapter_name, self.peft_config[adapter_name])
        except Exception:
            _restore_modules(model, originals)
            raise

    def _create_and_replace(self, config: TuckerAdapterConfig, adapter_name: str, target: nn.Module,
                            target_name: str, parent: nn.Module, current_key: str, **optional_kwargs) -> None:
        rank_key = get_pattern_key(config.rank_pattern.keys(), current_key)
        r = config.rank_pattern.get(rank_key, config.r)
        kwargs = dict(r=r if isinstance(r, int) else max(r), r_min=config.r_min, r_max=config.r_max,
                      tau=config.tau, absolute_tau=config.absolute_tau, scale=config.scale,
                      dropout=config.dropout, inference_mode=config.inference_mode,
                      factorize_spatial=config.factorize_spatial, conv_layout=config.conv_layout,
                      target_params=config.target_params)
        if isinstance(target, TDLRTLayer):
            target.update_layer(adapter_name, **kwargs)
            return
        new_module = self._create_new_module(config, adapter_name, target, current_key, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(config: TuckerAdapterConfig, adapter_name: str, target: nn.Module, current_key: str,
                           **kwargs) -> TDLRTLayer:
        base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
        for layer_type, adapter_cls in LAYER_TYPES.items():
            if type(base) is layer_type or isinstance(base, layer_type):
                return adapter_cls(target, adapter_name, config=config, module_name=current_key, **kwargs)
        supported = ", ".join(t.__name__ for t in LAYER_TYPES)
        raise ValueError(f"TuckerAdapterConfig.target_modules matched {current_key!r} of type "
                         f"{type(base).__name__}, which TDLRT does not support (supported: {supported}). "
                         "Remove it from target_modules or add it to exclude_modules.")

    def _prepare_adapter_config(self, peft_config: TuckerAdapterConfig, model_config: dict) -> TuckerAdapterConfig:
        # our defaults are regexes (strings); peft < 0.19 would turn a string into a set of characters
        if peft_config.target_modules is None:
            target_modules = self.target_module_mapping.get(model_config["model_type"])
            if target_modules is None:
                raise ValueError(f"TuckerAdapterConfig.target_modules is required for model type "
                                 f"{model_config['model_type']!r}: name the modules to adapt.")
            peft_config.target_modules = target_modules if isinstance(target_modules, str) else set(target_modules)
        return peft_config

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's dtype policy: adapters live in the base model's dtype; ``autocast_adapter_dtype=True`` (the
        default of ``get_peft_model`` / ``PeftModel.from_pretrained``) upcasts float16 / bfloat16 adapters to
        float32 (every tensor: factors, core, Adam buffers). The upcast bases, rounded to half precision at
        creation or saved from a half-precision adapter, are then re-orthonormalised in float32
        (``TDLRTLayer.restore_orthonormality``, ΔW unchanged); a float32 adapter is left bit for bit (Trainer resume).
        PEFT re-wraps upcast ``ParameterDict`` entries as new, trainable parameters: a frozen (inactive) adapter's
        ``requires_grad`` is put back."""
        trainable = {name: p.requires_grad for name, p in self.model.named_parameters() if self.prefix in name}
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        for name, p in self.model.named_parameters():
            if name in trainable:
                p.requires_grad_(trainable[name])
        for module in self.model.modules():
            if isinstance(module, TDLRTLayer) and adapter_name in module.tdlrt_S:
                module.restore_orthonormality(adapter_name, rounded_only=True)

    def update_rank_pattern(self, adapter_name: str = "default") -> dict:
        """Record the current ranks in ``peft_config[adapter_name].rank_pattern`` (saved with the adapter)."""
        pattern = rank_pattern(self.model, adapter_name)
        self.peft_config[adapter_name].rank_pattern = pattern
        return pattern

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        # peft >= 0.21 save hook: the ranks go into the saved config next to the compact tensors
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        config.rank_pattern = rank_pattern(model, adapter_name)
        return to_return

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        # unloading a modules_to_save copy of a module without .weight (e.g. BertPooler): the base
        # implementation copies child.weight unconditionally
        if not hasattr(new_module, "base_layer") and not hasattr(child, "weight"):
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        # peft >= 0.21 load hook, before anything is loaded: refuse a checkpoint for other modules (PEFT would
        # load the overlap silently)
        check_saved_adapter(model, adapter_name, state_dict)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)


def attach_budget(model: nn.Module, adapter_name: str, config: TuckerAdapterConfig) -> None:
    """Budget mode: refuse a ``target_params`` the adapters cannot meet (feasible range in the error), and start
    every adapter within it (``layers/budget.py``)."""
    target = getattr(config, "target_params", None)
    if target is None:
        return
    storages = list(iter_storages(model, adapter_name))
    budget = ParameterBudget(target, adapter_name)
    check_budget(storages, budget, "TuckerAdapterConfig.target_params")
    fit_initial_ranks(storages, budget)


def _restore_modules(model: nn.Module, originals: list[tuple[str, nn.Module]]) -> None:
    """Put every submodule back where ``model.named_modules()`` found it (parents before children)."""
    for name, module in originals:
        if name:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            if parent._modules.get(child) is not module:
                parent._modules[child] = module


def rank_pattern(model: nn.Module, adapter_name: str) -> dict:
    """Module name (relative to the base model) -> rank (int for a shared rank, else a list per mode)."""
    return {name.removeprefix("base_model.model."): (ranks[0] if len(set(ranks)) == 1 else list(ranks))
            for name, ranks in adapter_ranks(model, adapter_name).items()}
