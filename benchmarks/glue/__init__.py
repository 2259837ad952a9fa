"""GLUE benchmark runner: TDLRT against LoRA, AdaLoRA and full fine-tuning on ``transformers.Trainer``.

Run ``python -m benchmarks.glue --help``. With no arguments it runs the offline demo (``--preset demo``).
"""


class RunnerError(RuntimeError):
    """A user-facing error (bad argument, missing data or model): printed without a traceback."""
