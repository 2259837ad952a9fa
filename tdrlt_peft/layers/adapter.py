"""PEFT adapter layers: ``W0 x + scale * (ΔW x)`` with ``ΔW`` a rank-adaptive low-rank (Tucker) tensor.

The layer only stores tensors and computes the forward; the geometry lives in ``step.py`` and the step is
run by ``TDLRTIntegrator`` (``TDLRTCallback`` under the Trainer). Storage is fixed-size (see ``storage.py``);
``state_dict`` holds only the active slices and loading pads them back, so a checkpoint whose ranks differ
from the live model loads (Trainer resume included).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import Tensor, nn

from ..math.adam import AdamMoments
from ..math.engine import RankBounds
from ..math.geometry import compute_dtype, in_manifold, orthonormalize, random_orthonormal
from ..math.tucker import mode_dot
from .functional import lowrank_linear
from .inventory import layer_created
from .rank_mirror import refresh as refresh_widths
from .scaling import AdapterScaling
from .storage import LowRankStorage, ParameterBudget, factor_moment_shape, factor_moment_views
from .tracker import StepTracker


class TDLRTLayer(AdapterScaling, nn.Module, BaseTunerLayer):
    """Shared state of TDLRT adapter layers; subclasses define the factor tensors and the forward.

    Per adapter: the factor parameters named in ``factor_names`` (mode i's factor, None for an unfactorized
    mode), the core ``tdlrt_S``, the rank buffer ``tdlrt_rank`` and the Adam buffers ``tdlrt_adam_*``.
    """

    factor_names: tuple[str | None, ...] = ("tdlrt_U", "tdlrt_V")
    adapter_layer_names = ("tdlrt_U", "tdlrt_S", "tdlrt_V")
    moment_names = ("tdlrt_adam_m", "tdlrt_adam_v", "tdlrt_adam_wm", "tdlrt_adam_wv")
    factor_moment_name = "tdlrt_adam_K"    # Adam moments of the K-gradients, see storage.factor_moment_views
    other_param_names = ("tdlrt_rank", *moment_names, factor_moment_name, "tdlrt_scale", "tdlrt_dropout",
                         "tdlrt_bounds", "tdlrt_budget")
    matrix = True

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        layer_created()            # a deep copy or an unpickled layer is a new layer too (inventory.py)

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        super().__init__()
        layer_created()
        self.base_layer = base_layer
        base = self.get_base_layer()
        # PEFT's layers expose the base layer's sizes (convolutions: in_channels / out_channels, see conv.py)
        self.in_features = getattr(base, "in_features", None)
        self.out_features = getattr(base, "out_features", None)
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ParameterDict({}))
        for name in ("tdlrt_rank", *self.moment_names, self.factor_moment_name):
            setattr(self, name, BufferDict({}, persistent=True))
        self.tdlrt_scale: dict[str, float] = {}
        self.tdlrt_bounds: dict[str, RankBounds] = {}
        self.tdlrt_budget: dict[str, ParameterBudget | None] = {}
        self.tdlrt_dropout = nn.ModuleDict({})
        self._ranks: dict[str, list[int]] = {}
        self._trackers: dict[str, StepTracker] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        self._register_state_dict_hook(_compact_state_dict)
        self.register_load_state_dict_pre_hook(_pad_state_dict)
        self.register_load_state_dict_post_hook(_after_load)

    # ----------------------------------------------------------------- storage
    @property
    def _available_adapters(self) -> set[str]:
        return set(self.tdlrt_S)

    def mode_sizes(self) -> list[int]:
        """``n_i`` of the weight's modes (Linear: ``[out, in]``)."""
        return list(self.get_base_layer().weight.shape)

    def factorized_modes(self) -> list[bool]:
        return [name is not None for name in self.factor_names]

    def storage(self, adapter: str, name: str = "") -> LowRankStorage:
        moments = AdamMoments(*(getattr(self, n)[adapter] for n in self.moment_names))
        buffers = getattr(self, self.factor_moment_name)
        k_buffer = buffers[adapter] if adapter in buffers else None
        moments.factors = factor_moment_views(k_buffer, self.mode_sizes(), self.factorized_modes())
        return LowRankStorage(
            name=name, core=self.tdlrt_S[adapter],
            factors=[None if n is None else getattr(self, n)[adapter] for n in self.factor_names],
            ranks=self._ranks[adapter], rank_buffer=self.tdlrt_rank[adapter], bounds=self.tdlrt_bounds[adapter],
            matrix=self.matrix, tracker=self._trackers[adapter], moments=moments, k_buffer=k_buffer,
            scale=self.tdlrt_scale[adapter], budget=self.tdlrt_budget.get(adapter))

    def tdlrt_storages(self, module_name: str, adapter_name: str | None = None) -> list[LowRankStorage]:
        names = [adapter_name] if adapter_name is not None else self.active_adapters
        return [self.storage(a, module_name) for a in names if a in self.tdlrt_S]

    def update_layer(self, adapter_name: str, r: int, r_min: int, r_max: int, tau: float, scale: float,
                     dropout: float = 0.0, absolute_tau: bool = False, init_weights: bool = True,
                     inference_mode: bool = False, target_params: int | None = None, **kwargs: Any) -> None:
        """Create adapter ``adapter_name``: orthonormal random factors at rank ``r``, zero core (ΔW = 0).

        Every adapter tensor is stored in the base weight's dtype (float32 for any other base dtype), as PEFT's
        methods do; ``get_peft_model(..., autocast_adapter_dtype=True)`` (PEFT's default) then upcasts float16 /
        bfloat16 adapters to float32 (``TDLRTModel._cast_adapter_dtype``). The bases are drawn in float32 / float64
        and rounded to the storage dtype.
        """
        base = self.get_base_layer()
        dtype = storage_dtype(base.weight.dtype)
        work = compute_dtype(dtype)   # orthonormal bases are built in float32 / float64, never in half precision
        device = base.weight.device
        sizes = self.mode_sizes()
        factored = self.factorized_modes()
        # storage width R_i = min(r_max, n_i); unfactorized modes keep their full size
        widths = [min(r_max, n) if f else n for n, f in zip(sizes, factored)]
        if self.matrix:   # U S V^T: one rank shared by both sides
            r = min([r, *[w for w, f in zip(widths, factored) if f]])
        ranks = [min(r, w) if f else n for n, w, f in zip(sizes, widths, factored)]
        for name, n, width, rank in zip(self.factor_names, sizes, widths, ranks):
            if name is None:
                continue
            U = torch.zeros(n, width, dtype=dtype, device=device)
            U[:, :rank] = random_orthonormal(n, rank, dtype=work, device=device).to(dtype)
            getattr(self, name)[adapter_name] = nn.Parameter(U)
        self.tdlrt_S[adapter_name] = nn.Parameter(torch.zeros(widths, dtype=dtype, device=device))
        self.tdlrt_rank[adapter_name] = torch.tensor(ranks, dtype=torch.int64, device=device)
        for name in self.moment_names:
            getattr(self, name)[adapter_name] = torch.zeros(widths, dtype=dtype, device=device)
        getattr(self, self.factor_moment_name)[adapter_name] = torch.zeros(
            factor_moment_shape(sizes, widths, factored), dtype=dtype, device=device)
        self._ranks[adapter_name] = list(ranks)
        self._trackers[adapter_name] = StepTracker()
        self.tdlrt_scale[adapter_name] = float(scale)
        self.tdlrt_bounds[adapter_name] = RankBounds(tau=tau, r_min=r_min, r_max=r_max, absolute=absolute_tau)
        # budget mode: this adapter's ranks are decided with every other adapter of the config (layers/budget.py)
        self.tdlrt_budget[adapter_name] = None if target_params is None else ParameterBudget(target_params,
                                                                                             adapter_name)
        self.tdlrt_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @torch.no_grad()
    def restore_orthonormality(self, adapter: str, rounded_only: bool = False) -> list[int]:
        """Re-orthonormalise the active bases of ``adapter`` that fail ``in_manifold`` at their own dtype, with
        ΔW unchanged (``U = Q R``, the core takes ``R``); returns the repaired modes. ``rounded_only``: only bases
        whose every entry is a bfloat16 / float16 value (rounded to half precision, then upcast).

        PEFT's float32 upcast of half-precision factors leaves bases that are orthonormal only to half precision
        (max |U^T U - I| ~ 1e-3 against float32's tolerance ~ 1e-6); this restores float32 accuracy. Adam moments
        are left as they are (R = I + O(eps of the old dtype)). A no-op on the meta device.
        """
        s = self.storage(adapter)
        if s.core.device.type == "meta":
            return []
        work = compute_dtype(s.core.dtype)
        ranks = s.rank_buffer.tolist()                    # exact ranks (a host read; this runs at set-up)
        core = s.core[tuple(slice(0, r) for r in ranks)].to(work)       # views are fine: write copies first
        factors = [None if U is None else U[:, :r] for U, r in zip(s.factors, ranks)]
        new_factors: list[Tensor | None] = []
        repaired: list[int] = []
        for i, U in enumerate(factors):
            if U is None or in_manifold(U) or (rounded_only and not half_rounded(U)):
                new_factors.append(None if U is None else U.to(work))
                continue
            Q, R = orthonormalize(U.to(work))
            new_factors.append(Q)
            core = mode_dot(core, R, i)
            repaired.append(i)
        if repaired:
            s.write(core, new_factors, None)
        return repaired

    # ----------------------------------------------------------------- PEFT API
    def get_delta_weight(self, adapter: str) -> Tensor:
        """``scale * C x_1 U_1 ... x_d U_d`` in the base weight's dtype."""
        from ..math.tucker import tucker_to_tensor

        core, factors = self.storage(adapter).active()
        delta = tucker_to_tensor(core, factors) * self.tdlrt_scale[adapter]
        return delta.to(self.get_base_layer().weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names:
            if adapter not in self._available_adapters:
                continue
            weight = self.get_base_layer().weight
            delta = self.get_delta_weight(adapter)
            if safe_merge and not torch.isfinite(weight.data + delta).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
            weight.data += delta
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self._available_adapters:
                self.get_base_layer().weight.data -= self.get_delta_weight(adapter)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        refresh_widths()                                   # exact slicing widths once the step's copy landed
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for adapter in self.active_adapters:
            if adapter not in self._available_adapters:
                continue
            if self.training and torch.is_grad_enabled():
                factor = next(getattr(self, n)[adapter] for n in self.factor_names if n is not None)
                self._trackers[adapter].check(factor, f"adapter {adapter!r} of {type(self).__name__}")
            result = result + self.delta_forward(adapter, x).to(result.dtype)
        return result

    def delta_forward(self, adapter: str, x: Tensor) -> Tensor:
        raise NotImplementedError  # each layer type computes its delta activations

    def __repr__(self) -> str:
        return "tdlrt." + super().__repr__()


class Linear(TDLRTLayer):
    """``nn.Linear`` + ``scale * x V S^T U^T``: U (out, R_out), S (R_out, R_in), V (in, R_in)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        super().__init__(base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    def delta_forward(self, adapter: str, x: Tensor) -> Tensor:
        U = self.tdlrt_U[adapter]
        x = self.tdlrt_dropout[adapter](x).to(U.dtype)
        return lowrank_linear(x, U, self.tdlrt_S[adapter], self.tdlrt_V[adapter], self._ranks[adapter][0],
                              self.tdlrt_scale[adapter], self._trackers[adapter])


STORAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def half_rounded(U: Tensor) -> bool:
    """Whether every entry of ``U`` is exactly a bfloat16 or a float16 value (it was stored in half precision)."""
    return any(torch.equal(U, U.to(half).to(U.dtype)) for half in (torch.bfloat16, torch.float16))


def storage_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The adapters' dtype for a base weight of ``weight_dtype``: the same, or float32 for any other dtype
    (e.g. float8 or an integer quantized weight)."""
    return weight_dtype if weight_dtype in STORAGE_DTYPES else torch.float32


# --------------------------------------------------------------------- compact state dicts
def _sliced_entries(layer: TDLRTLayer, adapter: str, ranks: list[int]) -> dict[str, tuple[slice, ...]]:
    """Attribute name -> the index of the active slice (core-shaped tensors and factors)."""
    core_index = tuple(slice(0, r) for r in ranks)
    entries = {"tdlrt_S": core_index, **{n: core_index for n in layer.moment_names}}
    factored_ranks = [r for r, f in zip(ranks, layer.factorized_modes()) if f]
    entries[layer.factor_moment_name] = (slice(None), slice(None), slice(0, max(factored_ranks)))
    for name, r in zip(layer.factor_names, ranks):
        if name is not None:
            entries[name] = (slice(None), slice(0, r))
    return entries


def _compact_state_dict(layer: TDLRTLayer, state_dict: dict, prefix: str, local_metadata) -> None:
    """State-dict hook: keep only the active slices (saved adapters are compact)."""
    for adapter in layer._ranks:
        ranks = layer.tdlrt_rank[adapter].tolist()        # exact ranks (the host widths may be a bound)
        for name, index in _sliced_entries(layer, adapter, ranks).items():
            key = f"{prefix}{name}.{adapter}"
            value = state_dict.get(key)
            if value is None or isinstance(value, nn.Parameter):   # keep_vars=True: leave parameters alone
                continue
            state_dict[key] = value[index].contiguous()


def _pad_state_dict(layer: TDLRTLayer, state_dict: dict, prefix: str, local_metadata, strict, missing_keys,
                    unexpected_keys, error_msgs) -> None:
    """Load pre-hook: zero-pad compact slices to the fixed storage size before the children load them."""
    for adapter in list(layer._ranks):
        rank_key = f"{prefix}tdlrt_rank.{adapter}"
        core_key = f"{prefix}tdlrt_S.{adapter}"
        if core_key not in state_dict:
            continue
        storage = layer.tdlrt_S[adapter]
        ranks = state_dict[rank_key].tolist() if rank_key in state_dict else list(state_dict[core_key].shape)
        if any(r > w for r, w in zip(ranks, storage.shape)):
            error_msgs.append(
                f"TDLRT adapter {adapter!r} at {prefix.rstrip('.')}: checkpoint ranks {ranks} exceed this "
                f"model's storage {list(storage.shape)}; build the adapter with r_max >= {max(ranks)}.")
            continue
        for name, index in _sliced_entries(layer, adapter, ranks).items():
            key = f"{prefix}{name}.{adapter}"
            if key not in state_dict:
                continue
            target = getattr(layer, name)[adapter]
            value = state_dict[key]
            if tuple(value.shape) == tuple(target.shape):
                continue
            if tuple(value.shape) != tuple(target[index].shape):
                error_msgs.append(f"TDLRT adapter {adapter!r} at {prefix.rstrip('.')}: {name} has shape "
                                  f"{tuple(value.shape)}, expected {tuple(target[index].shape)} for ranks {ranks}.")
                continue
            padded = torch.zeros(target.shape, dtype=value.dtype, device=value.device)
            padded[index] = value
            state_dict[key] = padded


def _after_load(layer: TDLRTLayer, incompatible_keys) -> None:
    """Load post-hook: the Python rank mirror follows the loaded rank buffer; no step is pending."""
    for adapter in layer._ranks:
        layer._ranks[adapter][:] = layer.tdlrt_rank[adapter].tolist()
        layer._trackers[adapter].after_step()
