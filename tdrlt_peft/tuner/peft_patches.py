"""Two small wrappers of ``PeftModel`` methods that have no per-tuner hook in every supported peft version.

* ``get_nb_trainable_parameters`` (and so ``print_trainable_parameters``) reports *active* parameters:
  factors are stored at their maximal width, so ``numel()`` would count ``r_max``-sized adapters.
* ``save_pretrained`` records the current ranks in ``rank_pattern`` before the config is written (peft >= 0.21
  also calls ``TDLRTModel._get_adapter_state_dict``; older versions have no save hook).

Both wrappers leave models without TDLRT adapters untouched, and applying them twice is harmless.
"""

from __future__ import annotations

from peft import PeftModel

from ..layers.inventory import iter_storages


def _patched(original) -> bool:
    return getattr(original, "_tdlrt_patched", False)


def patch_peft_model() -> None:
    count, save = PeftModel.get_nb_trainable_parameters, PeftModel.save_pretrained

    if not _patched(count):
        def get_nb_trainable_parameters(self) -> tuple[int, int]:
            trainable, total = count(self)
            for s in iter_storages(self):
                inactive = sum(p.numel() for p in s.parameters()) - s.num_active_parameters()
                total -= inactive
                if s.core.requires_grad:
                    trainable -= inactive
            return trainable, total

        get_nb_trainable_parameters._tdlrt_patched = True
        get_nb_trainable_parameters.__doc__ = count.__doc__
        PeftModel.get_nb_trainable_parameters = get_nb_trainable_parameters

    if not _patched(save):
        def save_pretrained(self, *args, **kwargs):
            update = getattr(self.base_model, "update_rank_pattern", None)
            if callable(update):
                for name, config in self.peft_config.items():
                    if config.peft_type == "TDLRT":
                        update(name)
            return save(self, *args, **kwargs)

        save_pretrained._tdlrt_patched = True
        save_pretrained.__doc__ = save.__doc__
        PeftModel.save_pretrained = save_pretrained
