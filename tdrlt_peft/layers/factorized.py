"""Factorized layers: the weight itself is low-rank, no dense weight is kept (compression, training from scratch).

* ``FactorizedLinear``: ``W = U S V^T`` (a matrix Tucker tensor ``(S, [U, V])``).
* ``FactorizedConv`` (1d/2d/3d, ``groups == 1``): ``W = C x_1 U_1 x_2 U_2 [x_3 U_3 ...]`` (``layout="tucker"``,
  spatial modes factorized only with ``factorize_spatial``) or ``Mat(W) = U S V^T`` with ``Mat(W)`` the
  (out, in * prod k) reshape of the kernel (``layout="matrix"``).

``train_with="integrator"``: the layers expose ``tdlrt_storages`` and are trained, rank-adaptively, by
``TDLRTIntegrator`` (their backward delivers the TDLRT gradients). ``train_with="optimizer"``: ordinary autograd
at fixed ranks, every factor trained by the user's optimizer (the "factorized gradient descent" baseline).
The bias stays an ordinary parameter either way (``TDLRTIntegrator.other_trainable_parameters()`` returns it).

``init="random"``: random orthonormal factors at rank ``r`` and a Gaussian core scaled so that ``||W||_F`` equals
that of the replaced module's weight (training from scratch keeps the module's initialisation scale).
``init="weights"``: truncated SVD / HOSVD of the module's weight, ranks by the tolerance ``tau`` (compression).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from ..math.adam import AdamMoments
from ..math.engine import RankBounds
from ..math.geometry import compute_dtype, random_orthonormal, truncation_rank
from ..math.tucker import project_to_core, tucker_to_tensor, unfold
from .budget import check_budget, fit_initial_ranks, truncate_to_budget
from .conv_functional import (
    ConvSpec,
    check_groups,
    matrix_conv,
    matrix_conv_autograd,
    tucker_conv,
    tucker_conv_autograd,
)
from .functional import lowrank_linear
from .inventory import layer_created
from .rank_mirror import refresh as refresh_widths
from .storage import LowRankStorage, ParameterBudget, factor_moment_shape, factor_moment_views
from .tracker import StepTracker

Init = Literal["random", "weights"]
TrainWith = Literal["integrator", "optimizer"]
Layout = Literal["tucker", "matrix"]


class FactorizedLayer(nn.Module):
    """Shared storage of factorized layers: ``core``, ``factors`` (``"U1"``, ``"U2"``, ... for the factorized
    modes, 1-based), the rank buffer and Adam buffers; stored at fixed widths like adapters (``storage.py``)."""

    matrix: bool = False

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        layer_created()            # a deep copy or an unpickled layer is a new layer too (inventory.py)

    def __init__(self, core: Tensor, factors: list[Tensor | None], bias: Tensor | None, bounds: RankBounds,
                 train_with: TrainWith) -> None:
        """``core`` (r_1, ..., r_d) and ``factors[i]`` (n_i, r_i) or None: the initial active tensors."""
        super().__init__()
        layer_created()
        if train_with not in ("integrator", "optimizer"):
            raise ValueError(f"train_with must be 'integrator' or 'optimizer', got {train_with!r}.")
        self.train_with = train_with
        self.bounds = bounds
        self.factor_keys = [None if U is None else f"U{i + 1}" for i, U in enumerate(factors)]
        ranks = list(core.shape)
        if train_with == "integrator":
            # storage width R_i = min(r_max, n_i) of a factorized mode; a matrix keeps both sides' caps
            widths = [r if U is None else max(r, min(bounds.r_max, U.shape[0])) for U, r in zip(factors, ranks)]
        else:
            widths = ranks
        index = tuple(slice(0, r) for r in ranks)
        stored = core.new_zeros(widths)
        stored[index] = core
        self.core = nn.Parameter(stored)
        self.factors = nn.ParameterDict()
        for key, U, width in zip(self.factor_keys, factors, widths):
            if key is not None:
                padded = U.new_zeros(U.shape[0], width)
                padded[:, : U.shape[1]] = U
                self.factors[key] = nn.Parameter(padded)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.register_buffer("rank", torch.tensor(ranks, dtype=torch.int64, device=core.device))
        for name in ("adam_m", "adam_v", "adam_wm", "adam_wv"):
            self.register_buffer(name, torch.zeros_like(stored))
        sizes = [core.shape[i] if U is None else U.shape[0] for i, U in enumerate(factors)]
        self._factored = [U is not None for U in factors]
        self._sizes = sizes
        self.register_buffer("adam_K", core.new_zeros(factor_moment_shape(sizes, widths, self._factored)))
        self._ranks = ranks
        self._tracker = StepTracker()
        self.budget: ParameterBudget | None = None     # set by factorize(target_params=...): budget mode
        self.register_load_state_dict_pre_hook(_fill_missing_factor_moments)
        self.register_load_state_dict_post_hook(_after_load)

    def factor_list(self) -> list[nn.Parameter | None]:
        return [None if k is None else self.factors[k] for k in self.factor_keys]

    def storage(self, name: str = "") -> LowRankStorage:
        moments = AdamMoments(self.adam_m, self.adam_v, self.adam_wm, self.adam_wv,
                              factor_moment_views(self.adam_K, self._sizes, self._factored))
        return LowRankStorage(
            name=name, core=self.core, factors=self.factor_list(), ranks=self._ranks, rank_buffer=self.rank,
            bounds=self.bounds, matrix=self.matrix, tracker=self._tracker, moments=moments, k_buffer=self.adam_K,
            budget=self.budget)

    def tdlrt_storages(self, module_name: str, adapter_name: str | None = None) -> list[LowRankStorage]:
        """The integrator's view; empty for fixed-rank layers trained by an ordinary optimizer."""
        return [self.storage(module_name)] if self.train_with == "integrator" else []

    @property
    def ranks(self) -> list[int]:
        return list(self._ranks)

    def active(self) -> tuple[Tensor, list[Tensor | None]]:
        return self.storage().active()

    def check_step(self) -> None:
        refresh_widths()                                   # exact slicing widths once the step's copy landed
        if self.train_with == "integrator" and self.training and torch.is_grad_enabled():
            self._tracker.check(next(U for U in self.factor_list() if U is not None), type(self).__name__)

    def extra_repr(self) -> str:
        return f"ranks={self.ranks}, train_with={self.train_with!r}, bias={self.bias is not None}"


class FactorizedLinear(FactorizedLayer):
    """``y = x V S^T U^T + b`` with ``U`` (out, R), ``S`` (R, R'), ``V`` (in, R') (``factors`` U1, U2)."""

    matrix = True

    def forward(self, x: Tensor) -> Tensor:
        self.check_step()
        U, V = self.factors["U1"], self.factors["U2"]
        x = x.to(U.dtype)
        if self.train_with == "integrator":
            y = lowrank_linear(x, U, self.core, V, self._ranks[0], 1.0, self._tracker)
        else:
            y = x @ V @ self.core.T @ U.T
        return y if self.bias is None else y + self.bias

    @property
    def weight(self) -> Tensor:
        """The dense ``U S V^T`` (out, in), rebuilt; not a parameter."""
        core, factors = self.active()
        return tucker_to_tensor(core, factors)


class FactorizedConv(FactorizedLayer):
    """Low-rank convolution (Tucker or reshaped-matrix kernel, see the module docstring) plus bias."""

    def __init__(self, core: Tensor, factors: list[Tensor | None], bias: Tensor | None, bounds: RankBounds,
                 train_with: TrainWith, spec: ConvSpec, in_channels: int, layout: Layout) -> None:
        self.matrix = layout == "matrix"   # class attribute shadowed per instance (before the storage is built)
        super().__init__(core, factors, bias, bounds, train_with)
        self.spec = spec
        self.in_channels = in_channels
        self.layout = layout

    def forward(self, x: Tensor) -> Tensor:
        self.check_step()
        x = x.to(self.core.dtype)
        x, geometry = self.spec.prepare(x)
        factors = self.factor_list()
        k = self.spec.kernel_size
        if self.layout == "matrix":
            U, V = factors
            if self.train_with == "integrator":
                y = matrix_conv(x, U, self.core, V, self._ranks[0], k, geometry, self._tracker)
            else:
                y = matrix_conv_autograd(x, U, self.core, V, k, geometry)
        elif self.train_with == "integrator":
            y = tucker_conv(x, self.core, factors, self._ranks, self.rank, geometry, 1.0, self._tracker)
        else:
            y = tucker_conv_autograd(x, self.core, factors, geometry)
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, *[1] * len(k))
        return y

    @property
    def weight(self) -> Tensor:
        """The dense kernel (out, in, *k), rebuilt; not a parameter."""
        core, factors = self.active()
        W = tucker_to_tensor(core, factors)
        return W.reshape(W.shape[0], self.in_channels, *self.spec.kernel_size)

    def extra_repr(self) -> str:
        return f"layout={self.layout!r}, kernel_size={self.spec.kernel_size}, " + super().extra_repr()


def _fill_missing_factor_moments(layer: FactorizedLayer, state_dict: dict, prefix: str, *args) -> None:
    """Load pre-hook: a state dict saved before the K-gradient moments existed loads with them at zero (no
    history), instead of failing a strict load."""
    key = f"{prefix}adam_K"
    if f"{prefix}core" in state_dict and key not in state_dict:
        state_dict[key] = torch.zeros_like(layer.adam_K)


def _after_load(layer: FactorizedLayer, incompatible_keys) -> None:
    """The Python rank mirror follows the loaded rank buffer; no step is pending."""
    layer._ranks[:] = layer.rank.tolist()
    layer._tracker.after_step()


# --------------------------------------------------------------------- building from a module
def _random_tucker(weight: Tensor, sizes: list[int], factored: list[bool], ranks: list[int]
                   ) -> tuple[Tensor, list[Tensor | None]]:
    """Random orthonormal factors and a Gaussian core scaled to ``||C||_F = ||W||_F = ||weight||_F``."""
    dtype, device = weight.dtype, weight.device
    factors = [random_orthonormal(n, r, dtype=dtype, device=device) if f else None
               for n, r, f in zip(sizes, ranks, factored)]
    core = torch.randn(ranks, dtype=dtype, device=device)
    core *= torch.linalg.norm(weight) / torch.linalg.norm(core)
    return core, factors


def _truncated_tucker(weight: Tensor, factored: list[bool], bounds: RankBounds, matrix: bool
                      ) -> tuple[Tensor, list[Tensor | None]]:
    """Truncated SVD (matrix) / HOSVD of ``weight``; the rank of mode i by the tau rule on ``Mat_i(W)``.

    Error: ``||W - Ŵ||_F <= tau ||W||_F`` (matrix) and ``<= sqrt(#factorized modes) tau ||W||_F`` (HOSVD).
    """
    if matrix:
        P, sigma, Rh = torch.linalg.svd(weight, full_matrices=False)
        k = truncation_rank(sigma, bounds.tau, bounds.r_min, bounds.r_max, bounds.absolute)
        return torch.diag(sigma[:k]), [P[:, :k], Rh[:k].T]
    factors: list[Tensor | None] = []
    for i, f in enumerate(factored):
        if not f:
            factors.append(None)
            continue
        P, sigma, _ = torch.linalg.svd(unfold(weight, i), full_matrices=False)
        k = truncation_rank(sigma, bounds.tau, bounds.r_min, bounds.r_max, bounds.absolute)
        factors.append(P[:, :k])
    return project_to_core(weight, factors), factors


def factorized_from(module: nn.Module, *, init: Init = "random", r: int | Sequence[int] = 8, r_min: int = 1,
                    r_max: int = 32, tau: float = 0.1, absolute_tau: bool = False, factorize_spatial: bool = False,
                    layout: Layout = "tucker", train_with: TrainWith = "integrator", module_name: str | None = None
                    ) -> FactorizedLayer:
    """A factorized replacement of an ``nn.Linear`` or ``nn.ConvNd`` (see the module docstring).

    ``r``: initial ranks for ``init="random"`` (one int, or one per factorized mode); ``init="weights"`` takes
    the ranks from ``tau`` instead. Ranks are clamped to ``[r_min, min(r_max, n_i)]``.
    """
    if init not in ("random", "weights"):
        raise ValueError(f"init must be 'random' or 'weights', got {init!r}.")
    if layout not in ("tucker", "matrix"):
        raise ValueError(f"layout must be 'tucker' or 'matrix', got {layout!r}.")
    weight = module.weight.detach().to(compute_dtype(module.weight.dtype))
    bias = None if module.bias is None else module.bias.detach().to(weight.dtype)
    bounds = RankBounds(tau=tau, r_min=r_min, r_max=r_max, absolute=absolute_tau)
    is_conv = isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    if not is_conv and not isinstance(module, nn.Linear):
        raise ValueError(f"factorize: {module_name or type(module).__name__} is a {type(module).__name__}; "
                         "only nn.Linear and nn.Conv1d/2d/3d can be factorized.")
    if is_conv:
        check_groups(module, module_name)
    matrix = not is_conv or layout == "matrix"
    if matrix:
        weight = weight.reshape(weight.shape[0], -1)   # (out, in * prod k)
    sizes = list(weight.shape)
    factored = [True, True] + [factorize_spatial] * (len(sizes) - 2)
    if init == "weights":
        core, factors = _truncated_tucker(weight, factored, bounds, matrix)
    else:
        wanted = [r] * sum(factored) if isinstance(r, int) else list(r)
        if len(wanted) != sum(factored):
            raise ValueError(f"factorize: {module_name}: {len(wanted)} ranks given for {sum(factored)} modes.")
        caps = iter(wanted)
        ranks = [min(max(next(caps), r_min), r_max, n) if f else n for n, f in zip(sizes, factored)]
        if matrix:
            ranks = [min(ranks)] * 2   # U S V^T: one shared rank
        core, factors = _random_tucker(weight, sizes, factored, ranks)
    if not is_conv:
        return FactorizedLinear(core, factors, bias, bounds, train_with)
    return FactorizedConv(core, factors, bias, bounds, train_with, ConvSpec.from_module(module),
                          module.in_channels, layout)


def factorize(model: nn.Module, target_modules: Sequence[str] | str | None = None,
              r: int | Sequence[int] | Mapping[str, int | Sequence[int]] = 8, target_params: int | None = None,
              **kwargs) -> nn.Module:
    """Replace, in place, the targeted ``nn.Linear`` / ``nn.ConvNd`` modules of ``model`` by factorized layers.

    ``target_modules``: None = every Linear and ConvNd; a list of names (exact or ``.``-suffix match); a string
    is a regex that must match the whole module name. ``r`` may map module names to their ranks (e.g. the final
    ranks of a TDLRT run, to train the same shapes at fixed rank). Other keyword arguments: ``factorized_from``.
    Returns ``model``.

    ``target_params=N`` ("compress this network to N parameters", ``train_with="integrator"`` only): the
    factorized layers hold at most N active parameters (biases not counted), from the start and at every step
    (``layers/budget.py``). At the start, ``init="weights"`` truncates the HOSVD up to ``r_max`` to the budget by
    the largest singular values over all layers (instead of ``tau``); ``init="random"`` caps every layer at one
    common rank that fits, since random tensors carry no information on where the parameters matter. A budget
    outside the layers' reach is refused before any module is replaced. The budget is not in the state dict:
    rebuild with the same ``factorize`` call to load.
    """
    supported = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    chosen = []
    for name, module in model.named_modules():
        if not isinstance(module, supported) or not _is_target(name, target_modules):
            continue
        chosen.append(name)
    if not chosen:
        raise ValueError(f"factorize: no nn.Linear / nn.ConvNd module matches target_modules={target_modules!r}.")
    if target_params is not None:
        if kwargs.get("train_with", "integrator") != "integrator":
            raise ValueError("factorize(target_params=...) needs train_with='integrator': the budget is kept by the "
                             "rank-adaptive step, fixed-rank layers have no such step.")
        if kwargs.get("init") == "weights":
            kwargs["tau"] = 0.0            # the HOSVD up to r_max; the budget truncates it below
    layers = {}
    for name in chosen:
        if isinstance(r, Mapping) and name not in r:
            raise ValueError(f"factorize: r maps module names to ranks but has no entry for {name!r}.")
        ranks = r[name] if isinstance(r, Mapping) else r
        layers[name] = factorized_from(model.get_submodule(name), r=ranks, module_name=name, **kwargs)
    if target_params is not None:
        budget = ParameterBudget(target_params, "factorize")
        for layer in layers.values():
            layer.budget = budget
        storages = [layer.storage(name) for name, layer in layers.items()]
        check_budget(storages, budget, "factorize(target_params)")
        if kwargs.get("init") == "weights":
            truncate_to_budget(storages, budget)    # the weights' own spectra decide
        else:
            fit_initial_ranks(storages, budget)     # random tensors: one common rank cap
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
    return model


def _is_target(name: str, target_modules: Sequence[str] | str | None) -> bool:
    if target_modules is None:
        return True
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)
