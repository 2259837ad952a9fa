"""The two networks: LeNet-5 (Caffe sizes: 20 and 50 channels) and a small VGG, for 1x28x28 inputs.

The first convolution (one input channel, few parameters) stays dense in every method; the others are the
``compressed`` convolutions. Fully connected layers stay dense: the benchmark measures convolution compression.
"""

from __future__ import annotations

from torch import nn


def lenet5() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2),          # (B, 20, 12, 12)
        nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2),         # (B, 50, 4, 4)
        nn.Flatten(), nn.Linear(50 * 4 * 4, 500), nn.ReLU(), nn.Linear(500, 10))


def small_vgg() -> nn.Sequential:
    def block(n_in: int, n_out: int) -> list[nn.Module]:
        return [nn.Conv2d(n_in, n_out, 3, padding=1), nn.BatchNorm2d(n_out), nn.ReLU()]

    return nn.Sequential(
        *block(1, 16), nn.MaxPool2d(2),                           # (B, 16, 14, 14)
        *block(16, 32), *block(32, 32), nn.MaxPool2d(2),          # (B, 32, 7, 7)
        *block(32, 64), *block(64, 64), nn.MaxPool2d(2),          # (B, 64, 3, 3)
        nn.Flatten(), nn.Linear(64 * 3 * 3, 10))


NETWORKS = {"lenet5": lenet5, "vgg": small_vgg}


def compressed_convs(model: nn.Module) -> list[str]:
    """Names of the convolutions every low-rank method factorizes: all but the first."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return names[1:]


def conv_parameters(model: nn.Module) -> int:
    """Weights of all convolutions of a dense model (biases excluded)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
