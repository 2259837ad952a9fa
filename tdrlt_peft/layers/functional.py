"""Custom autograd for ``y = scale * x V S^T U^T`` delivering the TDLRT gradients in one backward pass.

With ``δ = scale * dL/dy`` and ``a = x V`` saved from the forward, ``G = dL/dW = δ^T x`` is never formed:

    U.grad <- G_K = G V     = δ^T a          (out, r)
    V.grad <- G_L = G^T U   = x^T (δ U)      (in, r)
    S.grad <- G_S = U^T G V = (δ U)^T a      (r, r)
    dx            = δ U S V^T

The same matmuls as LoRA's backward. The gradients are written at the factors' storage width (zeros past
the active rank ``r``), so ``.grad`` has the parameter's shape and DDP all-reduces it like any gradient.
These are *not* ``dL/dU`` etc.: only the TDLRT integrator may consume them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .tracker import StepTracker


class LowRankLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, U: Tensor, S: Tensor, V: Tensor, r: int, scale: float,
                tracker: StepTracker | None) -> Tensor:
        # x: (..., in), U: (out, R_out), S: (R_out, R_in), V: (in, R_in)
        U_r, S_r, V_r = U[:, :r], S[:r, :r], V[:, :r]
        a = x @ V_r                                  # (..., r)
        # the scale multiplies the r x r core, never the (..., out) output: no pass over the activations
        y = (a @ (scale * S_r).T) @ U_r.T            # (..., out)
        ctx.save_for_backward(x, a, U, S, V)
        ctx.r, ctx.scale, ctx.tracker = r, scale, tracker
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, a, U, S, V = ctx.saved_tensors
        r, dtype = ctx.r, U.dtype
        U_r, S_r, V_r = U[:, :r], S[:r, :r], V[:, :r]
        # δ = scale * dy is never formed: the scale goes onto the (N, r) factors δ U = scale (dy U) and scale * a
        dy2 = dy.reshape(-1, dy.shape[-1]).to(dtype)                    # (N, out)
        a = a.reshape(-1, r).to(dtype)                                  # (N, r)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)                       # (N, in)
        delta_U = (dy2 @ U_r) * ctx.scale                               # (N, r) = δ U
        dx = None
        if ctx.needs_input_grad[0]:
            dx = ((delta_U @ S_r) @ V_r.T).reshape(x.shape).to(x.dtype)
        grad_U = torch.zeros_like(U)
        grad_U[:, :r] = dy2.T @ (a * ctx.scale)                         # δ^T a
        grad_V = torch.zeros_like(V)
        grad_V[:, :r] = x2.T @ delta_U
        grad_S = torch.zeros_like(S)
        grad_S[:r, :r] = delta_U.T @ a
        if ctx.tracker is not None:
            ctx.tracker.after_backward(U)
        return dx, grad_U, grad_S, grad_V, None, None, None


def lowrank_linear(x: Tensor, U: Tensor, S: Tensor, V: Tensor, r: int, scale: float = 1.0,
                   tracker: StepTracker | None = None) -> Tensor:
    """``scale * x V_r S_r^T U_r^T`` with the TDLRT backward (see module docstring)."""
    return LowRankLinearFunction.apply(x, U, S, V, r, scale, tracker)
