"""Low-rank matrix problems with a known answer, as quadratic losses in the weight ``W`` (out x in), float64.

* regression: ``L(W) = 1/2 ||X (W - W_ls)^T||_F^2 = 1/2 tr((W - W_ls) Σ (W - W_ls)^T)`` with ``Σ = X^T X``
  (a Gaussian design, rescaled so that ``λ_max(Σ) = 1``: the gradient is 1-Lipschitz, full GD is stable for
  ``λ < 2``). ``W_ls = W* + noise`` (noise makes the minimiser full rank: the model error ``ε`` of the bound).
* completion: ``L(W) = 1/2 ||M ⊙ (W - W*)||_F^2`` with a random 0/1 mask ``M`` (also 1-Lipschitz).

``W* = U* diag(σ*) V*^T`` with ``σ*`` log-spaced from 1 down to ``smallest`` (1e-6): directions whose size spans
six orders of magnitude. A problem is evaluated through the TDLRT adapter as ``layer(inputs) ≈ targets``:
``layer(x) = x ΔW^T``, so ``inputs = Σ^{1/2}`` (regression) or ``I`` (completion) and the loss is a weighted
squared error of the layer's output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

F64 = torch.float64


def spread_singular_values(rank: int, largest: float = 1.0, smallest: float = 1e-6) -> Tensor:
    """``rank`` values log-spaced from ``largest`` to ``smallest``."""
    return torch.logspace(torch.log10(torch.tensor(largest)), torch.log10(torch.tensor(smallest)), rank,
                          dtype=F64)


def random_low_rank(n_out: int, n_in: int, sigma: Tensor, generator: torch.Generator) -> Tensor:
    """``U diag(sigma) V^T`` with Haar-random orthonormal ``U`` (n_out, r), ``V`` (n_in, r)."""
    U, _ = torch.linalg.qr(torch.randn(n_out, sigma.numel(), dtype=F64, generator=generator))
    V, _ = torch.linalg.qr(torch.randn(n_in, sigma.numel(), dtype=F64, generator=generator))
    return U @ torch.diag(sigma) @ V.T


@dataclass
class MatrixProblem:
    """A quadratic loss in W, its exact minimiser and its inputs/targets for a layer ``y = x W^T``.

    ``inputs`` (m, in), ``targets`` (m, out), ``weights`` (m, out): ``L(W) = 1/2 sum weights * (x W^T - y)^2``.
    """

    kind: str
    target: Tensor            # W* (out, in), the low-rank ground truth
    minimiser: Tensor         # W_ls (out, in): W* plus the noise's effect (= W* without noise)
    inputs: Tensor
    targets: Tensor
    weights: Tensor

    def loss(self, W: Tensor) -> Tensor:
        return self.output_loss(self.inputs @ W.T)

    def output_loss(self, outputs: Tensor) -> Tensor:
        return 0.5 * (self.weights * (outputs - self.targets) ** 2).sum()

    def gradient(self, W: Tensor) -> Tensor:
        """``dL/dW`` (out, in) = (weights * (x W^T - y))^T x."""
        return (self.weights * (self.inputs @ W.T - self.targets)).T @ self.inputs

    def relative_error(self, W: Tensor) -> float:
        """``||W - W*||_F / ||W*||_F``."""
        return (torch.linalg.norm(W - self.target) / torch.linalg.norm(self.target)).item()

    def flow(self, W0: Tensor, t: float) -> Tensor:
        """The gradient flow ``dW/dt = -dL/dW`` at time t (regression: ``W_ls + (W0 - W_ls) exp(-t Σ)``)."""
        if self.kind != "regression":
            raise ValueError("the closed-form flow is implemented for the regression problem only")
        sigma = self.inputs.T @ self.inputs                   # Σ (in, in)
        evals, evecs = torch.linalg.eigh(sigma)
        decay = evecs @ torch.diag(torch.exp(-t * evals)) @ evecs.T
        return self.minimiser + (W0 - self.minimiser) @ decay


def regression(n_out: int = 40, n_in: int = 50, rank: int = 8, smallest: float = 1e-6, noise: float = 0.0,
               samples: int = 200, seed: int = 0) -> MatrixProblem:
    """Gaussian-design regression, ``Σ = X^T X / λ_max`` (condition number ~ ((1 + sqrt(in/samples)) /
    (1 - sqrt(in/samples)))^2 = 9 for the defaults). ``noise``: Frobenius norm of a Gaussian perturbation of
    the minimiser (a full-rank part no rank-r model can fit)."""
    g = torch.Generator().manual_seed(seed)
    target = random_low_rank(n_out, n_in, spread_singular_values(rank, smallest=smallest), g)
    X = torch.randn(samples, n_in, dtype=F64, generator=g)
    sigma = X.T @ X
    sigma = sigma / torch.linalg.eigvalsh(sigma).max()
    evals, evecs = torch.linalg.eigh(sigma)
    root = evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T   # Σ^{1/2} (in, in): the layer's inputs
    perturbation = torch.randn(n_out, n_in, dtype=F64, generator=g)
    minimiser = target + noise * perturbation / torch.linalg.norm(perturbation)
    return MatrixProblem("regression", target, minimiser, root, root @ minimiser.T, torch.ones(n_in, n_out,
                                                                                               dtype=F64))


def completion(n_out: int = 40, n_in: int = 50, rank: int = 8, smallest: float = 1e-6, observed: float = 0.5,
               seed: int = 0) -> MatrixProblem:
    """Matrix completion: a fraction ``observed`` of the entries of ``W*`` is seen."""
    g = torch.Generator().manual_seed(seed)
    target = random_low_rank(n_out, n_in, spread_singular_values(rank, smallest=smallest), g)
    mask = (torch.rand(n_out, n_in, generator=g, dtype=F64) < observed).to(F64)
    eye = torch.eye(n_in, dtype=F64)
    return MatrixProblem("completion", target, target, eye, target.T.clone(), mask.T.contiguous())


def spread_initialisation(problem: MatrixProblem, rank: int, seed: int = 1, largest: float = 1.0,
                          smallest: float = 1e-6) -> Tensor:
    """An ill-conditioned starting point: rank ``rank``, singular values from ``largest`` to ``smallest``, random
    subspaces (unrelated to the target's)."""
    out, inp = problem.target.shape
    g = torch.Generator().manual_seed(seed)
    return random_low_rank(out, inp, spread_singular_values(rank, largest, smallest), g)


def aligned_initialisation(problem: MatrixProblem, rank: int) -> Tensor:
    """An ill-conditioned start in the target's own singular subspaces, singular values in reverse order
    (``U* diag(reversed σ*) V*^T``): the noise-free regression flow from it stays of rank ``rank``, since
    ``W(t) = W* + (W0 - W*) exp(-tΣ)`` keeps the column space of ``U*``."""
    P, s, Rt = torch.linalg.svd(problem.target, full_matrices=False)
    return P[:, :rank] @ torch.diag(s[:rank].flip(0)) @ Rt[:rank]


def factor(W0: Tensor, rank: int, imbalance: float = 1.0) -> tuple[Tensor, Tensor]:
    """LoRA factors ``B`` (out, r), ``A`` (r, in) with ``B A = W0`` (its rank-r SVD part):
    ``B = P diag(sqrt(s)) * imbalance``, ``A = diag(sqrt(s)) R^T / imbalance``. ``imbalance = 1``: balanced."""
    P, s, Rt = torch.linalg.svd(W0, full_matrices=False)
    root = s[:rank].sqrt()
    return P[:, :rank] * root * imbalance, (root[:, None] * Rt[:rank]) / imbalance
