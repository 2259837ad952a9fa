"""Low-rank convolutions with the TDLRT backward: a Tucker kernel and a matrix (reshaped) kernel.

Tucker kernel ``W = C x_1 U_1 x_2 U_2 [x_3 U_3 ...]`` of shape ``(out, in, *k)`` (spatial factors optional).
With ``Mat_i(C)^T = Q_i R_i`` (``engine.row_space_bases``) and ``K_i = U_i R_i^T``, the forward is

    z = U_2^T x                      1x1 conv        (B, r_2, *S)
    a = conv(z, Q_1 kernel)          core-sized conv (B, q_1, *S')   Q_1 kernel = Ten_1(Q_1^T) x_{j>2} U_j
    y = s * K_1 a                    1x1 conv        (B, out, *S')

(``K_1 a = U_1 R_1^T a = U_1 conv(z, C x_{j>2} U_j)``: the 1x1 -> core conv -> 1x1 chain.) With
``δ = s dL/dy`` and ``e = U_1^T δ`` the backward delivers, without forming ``G = dL/dW`` (out, in, *k):

    G_K1 = Mat_1(G x_{j != 1} U_j^T) Q_1 = sum_{b,p} δ a^T                         (out, q_1)
    G x_1 U_1^T x_2 U_2^T = conv weight-gradient of the conv z -> e               (r_1, r_2, *k)
    G_C  = that x_{j>2} U_j^T;   spatial G_Kj = Mat_j(that x_{l>2, l != j} U_l^T) Q_j
    t    = transposed conv of e with the Q_2 kernel Ten_2(Q_2^T) x_{j>2} U_j      (B, q_2, *S)
    G_K2 = Mat_2(G x_{j != 2} U_j^T) Q_2 = sum_{b,p} x t^T                         (in, q_2)
    dx   = K_2 t = U_2 R_2^T t                                                     (B, in, *S)

Matrix kernel ``Mat(W) = U S V^T`` with ``Mat(W)`` the (out, in * prod k) reshape (DLRT on convolutions):
``a = conv(x, Ten(V^T))``, ``y = U S a``; ``G_K = G V = sum δ a^T``, ``G_S = U^T G V = sum (U^T δ) a^T``,
``G_L = G^T U`` = weight-gradient of the conv x -> U^T δ, ``dx`` = transposed conv of ``S^T U^T δ``.

Gradients go into ``.grad`` at the storage width (zeros past the active rank) for the integrator only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..math.engine import row_space_bases
from ..math.geometry import compute_dtype
from ..math.threads import single_threaded_linalg
from ..math.tucker import fold, multi_mode_dot, unfold
from .tracker import StepTracker

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_WEIGHT = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}
_CONV_INPUT = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input, 3: torch.nn.grad.conv3d_input}


@dataclass(frozen=True)
class ConvGeometry:
    """Stride, (symmetric, integer) padding and dilation of an N-d convolution with ``groups == 1``."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]

    @property
    def dims(self) -> int:
        return len(self.stride)

    def conv(self, x: Tensor, kernel: Tensor) -> Tensor:
        return _CONV[self.dims](x, kernel, None, self.stride, self.padding, self.dilation)

    def weight_grad(self, x: Tensor, kernel_shape: list[int], grad_out: Tensor) -> Tensor:
        return _CONV_WEIGHT[self.dims](x, kernel_shape, grad_out, self.stride, self.padding, self.dilation)

    def input_grad(self, input_shape: list[int], kernel: Tensor, grad_out: Tensor) -> Tensor:
        return _CONV_INPUT[self.dims](input_shape, kernel, grad_out, self.stride, self.padding, self.dilation)


def check_groups(conv: nn.Module, module_name: str | None) -> None:
    """Refuse grouped convolutions: the 1x1 channel maps of a Tucker kernel do not respect the groups."""
    if getattr(conv, "groups", 1) != 1:
        where = f"module {module_name!r}" if module_name else "this module"
        raise ValueError(
            f"TDLRT: {where} is a grouped convolution ({type(conv).__name__} with groups={conv.groups}), which "
            "low-rank Tucker/matrix kernels do not support. Leave it out: add it to exclude_modules (PEFT) or "
            "drop it from target_modules.")


@dataclass(frozen=True)
class ConvSpec:
    """What a low-rank convolution needs of the ``nn.ConvNd`` it replaces or adapts."""

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    padding_mode: str
    reversed_padding: tuple[int, ...]    # F.pad amounts of a non-zero padding mode

    @classmethod
    def from_module(cls, conv: nn.Module) -> ConvSpec:
        padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
        return cls(tuple(conv.kernel_size), tuple(conv.stride), padding, tuple(conv.dilation), conv.padding_mode,
                   tuple(conv._reversed_padding_repeated_twice))

    def prepare(self, x: Tensor) -> tuple[Tensor, ConvGeometry]:
        """Apply the padding that a symmetric zero conv padding cannot express; return the conv geometry.

        Non-zero padding modes (reflect, replicate, circular) and asymmetric ``padding="same"`` are applied to
        ``x`` here (they act per channel, so they commute with the 1x1 channel maps); the rest is conv padding.
        """
        no_padding = (0,) * len(self.kernel_size)
        if self.padding_mode != "zeros":
            x = F.pad(x, self.reversed_padding, mode=self.padding_mode)
            return x, ConvGeometry(self.stride, no_padding, self.dilation)
        if self.padding == "valid":
            return x, ConvGeometry(self.stride, no_padding, self.dilation)
        if self.padding == "same":
            totals = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
            if all(t % 2 == 0 for t in totals):
                return x, ConvGeometry(self.stride, tuple(t // 2 for t in totals), self.dilation)
            # (left, right) per dim, last dim first; the extra row/column goes to the end, as in torch
            pads = [p for t in reversed(totals) for p in (t // 2, t - t // 2)]
            return F.pad(x, pads), ConvGeometry(self.stride, no_padding, self.dilation)
        return x, ConvGeometry(self.stride, self.padding, self.dilation)


def channel_mix(x: Tensor, M: Tensor) -> Tensor:
    """1x1 convolution ``M x``: (B, c, *S) -> (B, m, *S) with ``M`` (m, c)."""
    dims = x.dim() - 2
    return _CONV[dims](x, M.reshape(*M.shape, *[1] * dims))


def channel_gram(A: Tensor, B: Tensor) -> Tensor:
    """``sum_{b, s} A[b, :, s] B[b, :, s]^T``: (B, m, *S), (B, n, *S) -> (m, n)."""
    other = [0, *range(2, A.dim())]
    return torch.tensordot(A, B, dims=(other, other))


def core_unfolding_bases(core: Tensor, rank: Tensor, factored: list[bool]
                         ) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """``Q_i`` and ``R_i`` of ``Mat_i(C)^T = Q_i R_i`` for the factorized modes of ``core`` (sliced to the forward's
    widths, zero past the ranks ``rank`` (d,), a device tensor), computed as the integrator computes its ``Q_i``
    (``engine.row_space_bases``: same QR, same dtype, one thread): the K-gradients must use the very ``Q_i`` of
    the step, since ``Q_i`` is arbitrary where ``Mat_i(C)`` is rank-deficient. One thread also because
    multi-threaded LAPACK is ~1000x slower on such tiny QRs."""
    dtype = compute_dtype(core.dtype)
    with torch.no_grad(), single_threaded_linalg(core.device):
        work = core.detach().to(dtype)
        qs = [None if Q is None else Q[0] for Q in row_space_bases(work[None], rank[None], factored, matrix=False)]
        # R_i = Q_i^T Mat_i(C)^T   (q_i, r_i)
        rs = [None if Q is None else Q.T @ unfold(work, i).T for i, Q in enumerate(qs)]
    return [None if Q is None else Q.to(core.dtype) for Q in qs], [None if R is None else R.to(core.dtype) for R in rs]


def _slices(core: Tensor, factors: list[Tensor | None], ranks: list[int]) -> tuple[Tensor, list[Tensor | None]]:
    core = core[tuple(slice(0, r) for r in ranks)]
    return core, [None if U is None else U[:, :r] for U, r in zip(factors, ranks)]


def _grad_at_storage(storage: Tensor, grad: Tensor) -> Tensor:
    """``grad`` written into zeros shaped like the stored parameter (leading slices)."""
    out = torch.zeros_like(storage)
    out[tuple(slice(0, s) for s in grad.shape)] = grad
    return out


class TuckerConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, core: Tensor, ranks: list[int], rank: Tensor, geometry: ConvGeometry, scale: float,
                tracker: StepTracker | None, *factors: Tensor | None) -> Tensor:
        # x: (B, in, *S); core: (R_1, ..., R_d) storage; factors[i]: (n_i, R_i) or None (spatial, unfactorized)
        C, U = _slices(core, list(factors), ranks)
        spatial = [None, None, *U[2:]]
        qs, rs = core_unfolding_bases(C, rank, [f is not None for f in factors])
        q1_kernel = multi_mode_dot(fold(qs[0].T, 0, [qs[0].shape[1], *ranks[1:]]), spatial)   # (q_1, r_2, *k)
        z = channel_mix(x, U[1].T)                        # (B, r_2, *S)
        a = geometry.conv(z, q1_kernel)                   # (B, q_1, *S')
        y = channel_mix(a, U[0] @ rs[0].T)                # K_1 a: (B, out, *S')
        ctx.save_for_backward(x, z, a, core, *qs, *rs, *[f for f in factors if f is not None])
        ctx.ranks, ctx.geometry, ctx.scale, ctx.tracker = ranks, geometry, scale, tracker
        ctx.factored = [f is not None for f in factors]
        return y * scale

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, z, a, core, *rest = ctx.saved_tensors
        # under autocast the forward's convolutions saved half-precision activations: the backward runs in the
        # factors' dtype (as the linear adapter's does), and dx goes back in the input's
        z, a, x_dtype, x = z.to(core.dtype), a.to(core.dtype), x.dtype, x.to(core.dtype)
        d = core.dim()
        qs, rs, stored = rest[:d], rest[d:2 * d], iter(rest[2 * d:])
        factors = [next(stored) if f else None for f in ctx.factored]
        ranks, geometry = ctx.ranks, ctx.geometry
        _, U = _slices(core, factors, ranks)
        spatial = [None, None, *U[2:]]
        delta = dy.to(core.dtype) * ctx.scale             # (B, out, *S')
        grads: list[Tensor | None] = [None] * d
        grads[0] = channel_gram(delta, a)                 # G_K1 (out, q_1)
        e = channel_mix(delta, U[0].T)                    # (B, r_1, *S')
        kernel_shape = [ranks[0], ranks[1], *[r if u is None else u.shape[0] for u, r in zip(U[2:], ranks[2:])]]
        G_12 = geometry.weight_grad(z, kernel_shape, e)   # G x_1 U_1^T x_2 U_2^T: (r_1, r_2, *k)
        G_C = multi_mode_dot(G_12, spatial, transpose=True)
        for j in range(2, d):
            if U[j] is not None:
                # Mat_j(G x_{l != j} U_l^T) Q_j   (k_j, q_j)
                partial = multi_mode_dot(G_12, spatial, skip=j, transpose=True)
                grads[j] = partial.movedim(j, 0).reshape(partial.shape[j], -1) @ qs[j]
        q2_kernel = multi_mode_dot(fold(qs[1].T, 1, [ranks[0], qs[1].shape[1], *ranks[2:]]), spatial)
        t = geometry.input_grad([x.shape[0], qs[1].shape[1], *x.shape[2:]], q2_kernel, e)   # (B, q_2, *S)
        grads[1] = channel_gram(x, t)                     # G_K2 (in, q_2)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = channel_mix(t, U[1] @ rs[1].T).to(x_dtype)   # K_2 t: (B, in, *S)
        factor_grads = [None if f is None else _grad_at_storage(f, g) for f, g in zip(factors, grads)]
        if ctx.tracker is not None:
            ctx.tracker.after_backward(factors[0])
        return dx, _grad_at_storage(core, G_C), None, None, None, None, None, *factor_grads


def tucker_conv(x: Tensor, core: Tensor, factors: list[Tensor | None], ranks: list[int], rank: Tensor,
                geometry: ConvGeometry, scale: float = 1.0, tracker: StepTracker | None = None) -> Tensor:
    """``s * conv(x, C x_1 U_1 ... x_d U_d)`` on slices of widths ``ranks`` (at least the ranks ``rank``, a device
    tensor; entries past it are zero), with the TDLRT backward (module docstring)."""
    return TuckerConvFunction.apply(x, core, list(ranks), rank, geometry, scale, tracker, *factors)


def tucker_conv_autograd(x: Tensor, core: Tensor, factors: list[Tensor | None], geometry: ConvGeometry) -> Tensor:
    """The same forward with ordinary autograd (gradients ``dL/dU_i``, ``dL/dC``): fixed-rank factor training."""
    kernel = multi_mode_dot(core, [None, None, *factors[2:]])   # (r_1, r_2, *k)
    z = channel_mix(x, factors[1].T)                             # (B, r_2, *S)
    return channel_mix(geometry.conv(z, kernel), factors[0])     # (B, out, *S')


class MatrixConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, U: Tensor, S: Tensor, V: Tensor, r: int, kernel_size: tuple[int, ...],
                geometry: ConvGeometry, tracker: StepTracker | None, scale: float) -> Tensor:
        # U: (out, R_out), S: (R_out, R_in), V: (in * prod k, R_in)
        U_r, S_r, V_r = U[:, :r], S[:r, :r], V[:, :r]
        kernel = V_r.T.reshape(r, x.shape[1], *kernel_size)      # Ten(V^T): (r, in, *k)
        a = geometry.conv(x, kernel)                             # (B, r, *S')
        ctx.save_for_backward(x, a, U, S, V)
        ctx.r, ctx.kernel_size, ctx.geometry, ctx.tracker, ctx.scale = r, kernel_size, geometry, tracker, scale
        return channel_mix(a, U_r @ (scale * S_r))               # (B, out, *S'); the scale on the r x r core

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, a, U, S, V = ctx.saved_tensors
        x_dtype, x, a = x.dtype, x.to(U.dtype), a.to(U.dtype)      # autocast: see TuckerConvFunction.backward
        r, geometry = ctx.r, ctx.geometry
        U_r, S_r, V_r = U[:, :r], S[:r, :r], V[:, :r]
        dy = dy.to(U.dtype)                                      # (B, out, *S'); δ = scale * dy is never formed
        delta_U = channel_mix(dy, U_r.T * ctx.scale)             # U^T δ: (B, r, *S')
        G_K = channel_gram(dy, a) * ctx.scale                    # G V (out, r)
        G_S = channel_gram(delta_U, a)                           # U^T G V (r, r)
        kernel_shape = [r, x.shape[1], *ctx.kernel_size]
        G_L = geometry.weight_grad(x, kernel_shape, delta_U).reshape(r, -1).T   # G^T U (in * prod k, r)
        dx = None
        if ctx.needs_input_grad[0]:
            kernel = V_r.T.reshape(kernel_shape)
            dx = geometry.input_grad(list(x.shape), kernel, channel_mix(delta_U, S_r.T)).to(x_dtype)
        if ctx.tracker is not None:
            ctx.tracker.after_backward(U)
        return (dx, _grad_at_storage(U, G_K), _grad_at_storage(S, G_S), _grad_at_storage(V, G_L),
                None, None, None, None, None)


def matrix_conv(x: Tensor, U: Tensor, S: Tensor, V: Tensor, r: int, kernel_size: tuple[int, ...],
                geometry: ConvGeometry, tracker: StepTracker | None = None, scale: float = 1.0) -> Tensor:
    """``conv(x, Ten(scale * U_r S_r V_r^T))`` (kernel reshaped to a matrix) with the DLRT backward (module
    docstring)."""
    return MatrixConvFunction.apply(x, U, S, V, r, tuple(kernel_size), geometry, tracker, scale)


def matrix_conv_autograd(x: Tensor, U: Tensor, S: Tensor, V: Tensor, kernel_size: tuple[int, ...],
                         geometry: ConvGeometry) -> Tensor:
    """The matrix-kernel forward with ordinary autograd (fixed-rank factor training)."""
    kernel = V.T.reshape(V.shape[1], x.shape[1], *kernel_size)   # (r, in, *k)
    return channel_mix(geometry.conv(x, kernel), U @ S)
