"""``TDLRTModel``: the PEFT tuner that injects TDLRT adapter layers (thin: dispatch and config plumbing)."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner
from peft.utils.other import get_pattern_key
from torch import nn

from .config import TRANSFORMERS_MODELS_TO_TDLRT_TARGET_MODULES_MAPPING, TuckerAdapterConfig
from .conv import CONV_LAYER_TYPES
from .integrator import adapter_ranks
from .layer import Linear, TDLRTLayer
from .registration import PREFIX

# layer type -> adapter class (Tucker adapters of convolutions: conv.py)
LAYER_TYPES: dict[type[nn.Module], type[TDLRTLayer]] = {nn.Linear: Linear, **CONV_LAYER_TYPES}


class TDLRTModel(BaseTuner):
    """Injects rank-adaptive TDLRT adapters into the modules named by ``TuckerAdapterConfig``."""

    prefix: str = PREFIX
    tuner_layer_cls = TDLRTLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_TDLRT_TARGET_MODULES_MAPPING

    def _create_and_replace(self, config: TuckerAdapterConfig, adapter_name: str, target: nn.Module,
                            target_name: str, parent: nn.Module, current_key: str, **optional_kwargs) -> None:
        rank_key = get_pattern_key(config.rank_pattern.keys(), current_key)
        r = config.rank_pattern.get(rank_key, config.r)
        kwargs = dict(r=r if isinstance(r, int) else max(r), r_min=config.r_min, r_max=config.r_max,
                      tau=config.tau, absolute_tau=config.absolute_tau, scale=config.scale,
                      dropout=config.dropout, inference_mode=config.inference_mode,
                      factorize_spatial=config.factorize_spatial)
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


def rank_pattern(model: nn.Module, adapter_name: str) -> dict:
    """Module name (relative to the base model) -> rank (int for a shared rank, else a list per mode)."""
    return {name.removeprefix("base_model.model."): (ranks[0] if len(set(ranks)) == 1 else list(ranks))
            for name, ranks in adapter_ranks(model, adapter_name).items()}
