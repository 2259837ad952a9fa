"""Dreambooth benchmark: TDLRT against PEFT's LoRA, LoHa and LoKr on a diffusers ``UNet2DConditionModel``.

Run ``python -m benchmarks.dreambooth --help`` (also installed as ``tdrlt-dreambooth``). With no arguments it runs
fully offline: it builds (once, cached) a small text-conditioned pixel-space UNet on nine Fashion-MNIST classes
(``base.py``) and teaches it the tenth class as the subject "sks sneaker" from five images.
"""


class RunnerError(RuntimeError):
    """A user-facing error (bad argument, missing data or model): printed without a traceback."""
