"""Checks on a saved adapter before PEFT loads it."""

from __future__ import annotations

import torch

from ..layers.adapter import TDLRTLayer

_PEFT_PREFIX = "base_model.model."


class AdapterMismatchError(ValueError):
    """A saved TDLRT adapter does not cover the same modules as the model it is loaded into."""


def check_saved_adapter(model: torch.nn.Module, adapter_name: str, state_dict: dict) -> None:
    """Refuse to load a saved adapter (``state_dict`` as saved, keys without the adapter name) whose modules differ
    from those of the model's adapter ``adapter_name``: PEFT alone loads the overlap and silently leaves the rest
    at its initial value (modules only the model adapts) or drops it (modules only the checkpoint has)."""
    model_modules = {name.removeprefix(_PEFT_PREFIX) for name, module in model.named_modules()
                     if isinstance(module, TDLRTLayer) and adapter_name in module.tdlrt_S}
    saved_modules = {key.removeprefix(_PEFT_PREFIX).removesuffix(".tdlrt_S") for key in state_dict
                     if key.endswith(".tdlrt_S")}
    only_saved = sorted(saved_modules - model_modules)
    only_model = sorted(model_modules - saved_modules)
    if not only_saved and not only_model:
        return
    lines = [f"The saved TDLRT adapter does not match the model's adapter {adapter_name!r} (a different "
             "architecture, or different target_modules):"]
    if only_saved:
        lines.append(f"  saved for modules the model has no adapter on: {', '.join(only_saved)}")
    if only_model:
        lines.append(f"  model adapter modules missing from the checkpoint: {', '.join(only_model)}")
    lines.append("Load it into the architecture it was trained on, with the same target_modules.")
    raise AdapterMismatchError("\n".join(lines))
