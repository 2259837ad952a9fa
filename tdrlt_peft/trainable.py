"""Report *active* trainable parameters in ``PeftModel.print_trainable_parameters``.

Factors are stored at their maximal width, so counting ``numel()`` would report ``r_max``-sized adapters.
``PeftModel.get_nb_trainable_parameters`` has no per-tuner hook; this wraps it once and subtracts the
inactive storage of TDLRT adapters (models without them are unaffected).
"""

from __future__ import annotations

from peft import PeftModel

from .integrator import iter_storages


def patch_trainable_parameter_count() -> None:
    original = PeftModel.get_nb_trainable_parameters
    if getattr(original, "_tdlrt_patched", False):
        return

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable, total = original(self)
        for s in iter_storages(self):
            if s.core.requires_grad:
                stored = sum(p.numel() for p in s.parameters())
                trainable -= stored - s.num_active_parameters()
                total -= stored - s.num_active_parameters()
        return trainable, total

    get_nb_trainable_parameters._tdlrt_patched = True
    get_nb_trainable_parameters.__doc__ = original.__doc__
    PeftModel.get_nb_trainable_parameters = get_nb_trainable_parameters
