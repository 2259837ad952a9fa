"""PEFT Tucker adapters for convolutions: ``conv(x, W0 + s * C x_1 U_1 x_2 U_2 [x_3 U_3 ...])``.

Mode 1 is the output channels (``tdlrt_U``), mode 2 the input channels (``tdlrt_V``), modes 3.. the kernel's
spatial modes: unfactorized by default (identity factors, full rank, not stored) or, with
``factorize_spatial``, factorized and rank-adaptive too (``tdlrt_U3``, ``tdlrt_U4``, ``tdlrt_U5``). The forward
and the backward that delivers the TDLRT gradients are in ``conv_functional.py``; the step is the generic
Tucker step of ``step.py`` (``matrix = False``). Grouped convolutions are refused.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .adapter import TDLRTLayer
from .conv_functional import ConvSpec, check_groups, tucker_conv

SPATIAL_FACTOR_NAMES = ("tdlrt_U3", "tdlrt_U4", "tdlrt_U5")


class Conv(TDLRTLayer):
    """Tucker adapter of an ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` with ``groups == 1``.

    Core ``tdlrt_S`` (R_1, R_2, *k) (or (R_1, ..., R_d) with ``factorize_spatial``), ``tdlrt_U`` (out, R_1),
    ``tdlrt_V`` (in, R_2), spatial factors ``tdlrt_U3``... (k_j, R_j).
    """

    adapter_layer_names = ("tdlrt_U", "tdlrt_S", "tdlrt_V", *SPATIAL_FACTOR_NAMES)
    matrix = False

    def __init__(self, base_layer: nn.Module, adapter_name: str, factorize_spatial: bool = False,
                 module_name: str | None = None, **kwargs: Any) -> None:
        super().__init__(base_layer)
        base = self.get_base_layer()
        check_groups(base, module_name)
        self.in_features, self.out_features = base.in_channels, base.out_channels   # PEFT's convention
        spatial_dims = base.weight.dim() - 2
        spatial = SPATIAL_FACTOR_NAMES[:spatial_dims] if factorize_spatial else (None,) * spatial_dims
        # per instance: whether the spatial modes are factorized is a property of the layer
        self.factor_names = ("tdlrt_U", "tdlrt_V", *spatial)
        self.module_name = module_name
        self.conv_spec = ConvSpec.from_module(base)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    def update_layer(self, adapter_name: str, r: int, r_min: int, r_max: int, tau: float, scale: float,
                     factorize_spatial: bool | None = None, **kwargs: Any) -> None:
        if factorize_spatial is not None and factorize_spatial != self.factorize_spatial:
            raise ValueError(
                f"TDLRT: adapter {adapter_name!r} on {self.module_name or type(self).__name__} asks for "
                f"factorize_spatial={factorize_spatial}, but this layer's adapters use "
                f"factorize_spatial={self.factorize_spatial}; all adapters of a layer must agree.")
        super().update_layer(adapter_name, r=r, r_min=r_min, r_max=r_max, tau=tau, scale=scale, **kwargs)

    @property
    def factorize_spatial(self) -> bool:
        return self.factor_names[2] is not None

    def delta_forward(self, adapter: str, x: Tensor) -> Tensor:
        core = self.tdlrt_S[adapter]
        x = self.tdlrt_dropout[adapter](x).to(core.dtype)
        x, geometry = self.conv_spec.prepare(x)
        factors = [None if n is None else getattr(self, n)[adapter] for n in self.factor_names]
        return tucker_conv(x, core, factors, self._ranks[adapter], self.tdlrt_rank[adapter], geometry,
                           self.tdlrt_scale[adapter], self._trackers[adapter])


class Conv1d(Conv):
    """Tucker adapter of an ``nn.Conv1d``."""


class Conv2d(Conv):
    """Tucker adapter of an ``nn.Conv2d``."""


class Conv3d(Conv):
    """Tucker adapter of an ``nn.Conv3d``."""


CONV_LAYER_TYPES: dict[type[nn.Module], type[TDLRTLayer]] = {nn.Conv1d: Conv1d, nn.Conv2d: Conv2d, nn.Conv3d: Conv3d}
