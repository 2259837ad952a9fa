"""Where the runner computes (``--device``) and in which precision the UNet runs (``--mixed_precision``).

Every random number (training batches, noise, timesteps, evaluation noise, sampling latents) is drawn on the CPU
from its seeded ``torch.Generator`` and then moved to the device: a CPU run draws exactly the numbers it drew
before ``--device`` existed (the measured tables stay valid), and a GPU run draws the same numbers as a CPU run,
only the arithmetic differs.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from . import RunnerError

DEVICE_TYPES = ("cpu", "cuda")
# --mixed_precision as in diffusers' scripts: the dtype autocast runs the UNet in ("no": float32 throughout)
AUTOCAST_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def is_cuda(device: str) -> bool:
    return torch.device(device).type == "cuda"


def check_device(name: str) -> str:
    """``name`` if this machine can compute there, else a RunnerError that says what to pass instead."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise RunnerError(f"--device {name}: not a device name; use cpu, cuda or cuda:N") from err
    if device.type not in DEVICE_TYPES:
        raise RunnerError(f"--device {name}: the runner supports {', '.join(DEVICE_TYPES)} (and cuda:N)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RunnerError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__}, "
                              f"built with CUDA {torch.version.cuda or 'none'}). Run with --device cpu, or on a "
                              "machine with an NVIDIA GPU and a CUDA build of torch.")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise RunnerError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to "
                              f"cuda:{count - 1}")
    return name


def check_mixed_precision(mixed_precision: str, device: str) -> None:
    """bf16 needs hardware support on CUDA (pre-Ampere GPUs lack it: fp16 is their mixed precision)."""
    if mixed_precision == "bf16" and is_cuda(device) and not torch.cuda.is_bf16_supported():
        raise RunnerError(f"--mixed_precision bf16: the GPU of --device {device} does not support bfloat16; "
                          "use --mixed_precision fp16 (with a loss scaler) or no")


@dataclass(frozen=True)
class Compute:
    """The device of every model part and tensor, and the UNet's autocast dtype (None: float32)."""

    device: torch.device = torch.device("cpu")
    autocast_dtype: torch.dtype | None = None

    @classmethod
    def from_args(cls, args) -> Compute:
        return cls(torch.device(args.device), AUTOCAST_DTYPES[args.mixed_precision])

    def autocast(self):
        """The context of every UNet forward (training, losses, sampling); the TDLRT/AdamW steps stay outside."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """fp16 needs loss scaling (its range underflows small gradients); disabled, it passes everything
        through unchanged (``scale`` returns the loss, ``step`` calls ``optimizer.step()``)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)

    def synchronize(self) -> None:
        """Wait for the device's queued work (CUDA runs asynchronously: a clock read would miss it)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def randn(self, shape, generator: torch.Generator) -> Tensor:
        return torch.randn(shape, generator=generator).to(self.device)

    def randint(self, high: int, size: tuple[int, ...], generator: torch.Generator) -> Tensor:
        return torch.randint(0, high, size, generator=generator).to(self.device)


CPU = Compute()
