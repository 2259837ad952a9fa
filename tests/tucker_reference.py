"""Dense references for Tucker layers (float64): TDLRT gradients from G, the tangent projection, numpy HOSVD."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from tdrlt_peft.math.tucker import fold, multi_mode_dot, tucker_to_tensor, unfold


def core_gradient(G: Tensor, factors: list[Tensor | None]) -> Tensor:
    """G_C = G x_1 U_1^T ... x_d U_d^T."""
    return multi_mode_dot(G, factors, transpose=True)


def k_gradient(G: Tensor, core: Tensor, factors: list[Tensor | None], i: int) -> Tensor:
    """G_Ki = Mat_i(G x_{j != i} U_j^T) Q_i with Mat_i(C)^T = Q_i R_i (reduced QR)."""
    Q = torch.linalg.qr(unfold(core, i).T)[0]
    return unfold(multi_mode_dot(G, factors, skip=i, transpose=True), i) @ Q


def tangent_projection(core: Tensor, factors: list[Tensor | None], G: Tensor) -> Tensor:
    """P_T(G) = G x_j U_jU_j^T + sum_i C x_i [(I - U_iU_i^T) Mat_i(G x_{j != i} U_j^T) Mat_i(C)^+] x_{j != i} U_j.

    Unfactorized modes (None) have U_i = I: their projector is the identity and their sum term vanishes.
    """
    projectors = [None if U is None else U @ U.T for U in factors]
    result = multi_mode_dot(G, projectors)
    for i, U in enumerate(factors):
        if U is None:
            continue
        partial = unfold(multi_mode_dot(G, factors, skip=i, transpose=True), i)     # (n_i, prod_{j != i} r_j)
        orth = partial - U @ (U.T @ partial)
        M = orth @ torch.linalg.pinv(unfold(core, i))                               # (n_i, r_i)
        shape = list(core.shape)
        shape[i] = M.shape[0]
        result = result + multi_mode_dot(fold(M @ unfold(core, i), i, shape), factors, skip=i)
    return result


def numpy_hosvd_truncation(W: np.ndarray, modes: list[int], tau: float, r_min: int = 1
                           ) -> tuple[np.ndarray, list[int]]:
    """Per-mode rank k_i: smallest k with ||sigma_i[k:]|| <= tau ||W||_F (sigma_i of Mat_i(W)); W x_i P_i P_i^T."""
    ranks = []
    out = W
    total = np.linalg.norm(W)
    for i in modes:
        mat = np.moveaxis(W, i, 0).reshape(W.shape[i], -1)
        P, sigma, _ = np.linalg.svd(mat, full_matrices=False)
        sigma = np.where(sigma > 100 * np.finfo(sigma.dtype).eps * sigma[0], sigma, 0.0)
        k = next(k for k in range(len(sigma) + 1) if np.linalg.norm(sigma[k:]) <= tau * total)
        k = max(k, r_min)
        ranks.append(k)
        proj = P[:, :k] @ P[:, :k].T
        out = np.moveaxis(np.tensordot(proj, np.moveaxis(out, i, 0), axes=(1, 0)), 0, i)
    return out, ranks


def dense(core: Tensor, factors: list[Tensor | None]) -> Tensor:
    return tucker_to_tensor(core, factors)
