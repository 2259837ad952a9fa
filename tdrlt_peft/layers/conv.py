"""PEFT Tucker adapters for convolutions: ``conv(x, W0 + s * C x_1 U_1 x_2 U_2 [x_3 U_3 ...])``.

Mode 1 is the output channels (``tdlrt_U``), mode 2 the input channels (``tdlrt_V``), modes 3.. the kernel's
spatial modes: unfactorized by default (identity factors, full rank, not stored) or, with
``factorize_spatial``, factorized and rank-adaptive too (``tdlrt_U3``, ``tdlrt_U4``, ``tdlrt_U5``). The forward
and the backward that delivers the TDLRT gradients are in ``conv_functional.py``; the step is the generic
Tucker step of ``step.py`` (``matrix = False``). Grouped convolutions are refused.

With ``conv_layout="matrix"`` the adapter is instead a matrix ``U S V^T`` of the kernel's (out, in * prod k)
reshape, the layout LoRA uses on convolutions (``conv(x, Ten(V^T))`` then the 1x1 ``U S``): one rank, the
matrix step (``matrix = True``), ``tdlrt_V`` of shape (in * prod k, R).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from torch import Tensor, nn

from .adapter import TDLRTLayer
from .conv_functional import ConvSpec, check_groups, matrix_conv, tucker_conv

SPATIAL_FACTOR_NAMES = ("tdlrt_U3", "tdlrt_U4", "tdlrt_U5")
ConvLayout = Literal["tucker", "matrix"]
CONV_LAYOUTS = ("tucker", "matrix")


class Conv(TDLRTLayer):
    """Tucker adapter of an ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` with ``groups == 1``.

    Core ``tdlrt_S`` (R_1, R_2, *k) (or (R_1, ..., R_d) with ``factorize_spatial``), ``tdlrt_U`` (out, R_1),
    ``tdlrt_V`` (in, R_2), spatial factors ``tdlrt_U3``... (k_j, R_j). ``conv_layout="matrix"``: core (R, R),
    ``tdlrt_U`` (out, R), ``tdlrt_V`` (in * prod k, R).
    """

    adapter_layer_names = ("tdlrt_U", "tdlrt_S", "tdlrt_V", *SPATIAL_FACTOR_NAMES)
    matrix = False

    def __init__(self, base_layer: nn.Module, adapter_name: str, factorize_spatial: bool = False,
                 conv_layout: ConvLayout = "tucker", module_name: str | None = None, **kwargs: Any) -> None:
        super().__init__(base_layer)
        base = self.get_base_layer()
        check_groups(base, module_name)
        check_layout(conv_layout, factorize_spatial)
        self.in_features, self.out_features = base.in_channels, base.out_channels   # PEFT's convention
        spatial_dims = base.weight.dim() - 2
        spatial = SPATIAL_FACTOR_NAMES[:spatial_dims] if factorize_spatial else (None,) * spatial_dims
        # per instance (before any storage is built): the layout is a property of the layer
        self.matrix = conv_layout == "matrix"
        self.factor_names = ("tdlrt_U", "tdlrt_V") if self.matrix else ("tdlrt_U", "tdlrt_V", *spatial)
        self.module_name = module_name
        self.conv_spec = ConvSpec.from_module(base)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    def update_layer(self, adapter_name: str, r: int, r_min: int, r_max: int, tau: float, scale: float,
                     factorize_spatial: bool | None = None, conv_layout: ConvLayout | None = None,
                     **kwargs: Any) -> None:
        asked = {"factorize_spatial": factorize_spatial, "conv_layout": conv_layout}
        for name, value in asked.items():
            if value is not None and value != getattr(self, name):
                raise ValueError(
                    f"TDLRT: adapter {adapter_name!r} on {self.module_name or type(self).__name__} asks for "
                    f"{name}={value!r}, but this layer's adapters use {name}={getattr(self, name)!r}; all "
                    "adapters of a layer must agree.")
        super().update_layer(adapter_name, r=r, r_min=r_min, r_max=r_max, tau=tau, scale=scale, **kwargs)

    @property
    def factorize_spatial(self) -> bool:
        return not self.matrix and self.factor_names[2] is not None

    @property
    def conv_layout(self) -> ConvLayout:
        return "matrix" if self.matrix else "tucker"

    def mode_sizes(self) -> list[int]:
        """``[out, in, *k]``; the matrix layout: ``[out, in * prod k]``."""
        shape = list(self.get_base_layer().weight.shape)
        return [shape[0], math.prod(shape[1:])] if self.matrix else shape

    def get_delta_weight(self, adapter: str) -> Tensor:
        return super().get_delta_weight(adapter).reshape(self.get_base_layer().weight.shape)

    def delta_forward(self, adapter: str, x: Tensor) -> Tensor:
        core = self.tdlrt_S[adapter]
        x = self.tdlrt_dropout[adapter](x).to(core.dtype)
        x, geometry = self.conv_spec.prepare(x)
        factors = [None if n is None else getattr(self, n)[adapter] for n in self.factor_names]
        scale, tracker = self.tdlrt_scale[adapter], self._trackers[adapter]
        if self.matrix:
            return matrix_conv(x, factors[0], core, factors[1], self._ranks[adapter][0], self.conv_spec.kernel_size,
                               geometry, tracker, scale)
        return tucker_conv(x, core, factors, self._ranks[adapter], self.tdlrt_rank[adapter], geometry, scale, tracker)


def check_layout(conv_layout: str, factorize_spatial: bool) -> None:
    if conv_layout not in CONV_LAYOUTS:
        raise ValueError(f"TDLRT: conv_layout={conv_layout!r} is invalid: use "
                         + " or ".join(repr(name) for name in CONV_LAYOUTS) + ".")
    if conv_layout == "matrix" and factorize_spatial:
        raise ValueError("TDLRT: factorize_spatial=True needs conv_layout='tucker' (the matrix layout keeps the "
                         "kernel's spatial modes inside the (out, in * prod k) matrix); set one of them.")


class Conv1d(Conv):
    """Tucker adapter of an ``nn.Conv1d``."""


class Conv2d(Conv):
    """Tucker adapter of an ``nn.Conv2d``."""


class Conv3d(Conv):
    """Tucker adapter of an ``nn.Conv3d``."""


CONV_LAYER_TYPES: dict[type[nn.Module], type[TDLRTLayer]] = {nn.Conv1d: Conv1d, nn.Conv2d: Conv2d, nn.Conv3d: Conv3d}
