"""The stability claim on a small network: an MLP 64-128-128-10 on scikit-learn's digits (offline), full-batch
gradient descent, float64, sweeping the learning rate.

The two hidden layers are rank-16 low-rank layers started from the rank-16 truncated SVD of PyTorch's default
initialisation (the same function for every method): TDLRT at the fixed rank 16 (parallel and BUG, SGD core; a
``tdrlt_peft.layers.adapter.Linear`` adapter over a frozen zero weight plus a bias) against LoRA factors ``W = B A``
(balanced, SGD and Adam), and the dense network (full GD from the same start) for reference. Biases and the
dense head are trained by the same optimizer as the method's factors (SGD at the same λ; Adam for LoRA-Adam).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import Tensor, nn

from tdrlt_peft import TDLRTIntegrator

from .methods import DIVERGENCE_FACTOR, tdlrt_layer
from .problems import F64, factor

RANK = 16
HIDDEN = 128
METHODS = ("full GD", "LoRA-SGD", "LoRA-Adam", "TDLRT-parallel", "TDLRT-BUG")


def tasks(settings) -> list[dict]:
    return [{"experiment": "network", "method": m, "lr": lr, "steps": settings.network_steps}
            for lr in settings.network_lrs for m in METHODS]


def digits(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Standardised 8x8 digits, an 80/20 split: (x_train, y_train, x_test, y_test)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=F64)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    split = int(0.8 * len(y))
    mean, std = x[:split].mean(0), x[:split].std(0).clamp_min(1e-3)
    x = (x - mean) / std
    return x[:split], y[:split], x[split:], y[split:]


class LowRankHidden(nn.Module):
    """``x -> x W^T + b`` with ``W`` held by ``weight_module`` (a TDLRT adapter or a ``LoRAWeight``)."""

    def __init__(self, weight_module: nn.Module, bias: Tensor):
        super().__init__()
        self.weight_module = weight_module
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return self.weight_module(x) + self.bias


class LoRAWeight(nn.Module):
    """``x -> x (B A)^T`` (the LoRA parametrisation, no frozen base)."""

    def __init__(self, B: Tensor, A: Tensor):
        super().__init__()
        self.B, self.A = nn.Parameter(B), nn.Parameter(A)

    def forward(self, x: Tensor) -> Tensor:
        return (x @ self.A.T) @ self.B.T


def build(method: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(64, HIDDEN).to(F64), nn.Linear(HIDDEN, HIDDEN).to(F64)]
    head = nn.Linear(HIDDEN, 10).to(F64)
    modules: list[nn.Module] = []
    for layer in layers:
        W = layer.weight.detach()
        P, s, Rt = torch.linalg.svd(W, full_matrices=False)
        W0 = P[:, :RANK] @ torch.diag(s[:RANK]) @ Rt[:RANK]           # rank-16 start, the same for all
        if method == "full GD":
            dense = nn.Linear(W.shape[1], W.shape[0]).to(F64)
            with torch.no_grad():
                dense.weight.copy_(W0)
                dense.bias.copy_(layer.bias)
            modules += [dense, nn.ReLU()]
            continue
        if method.startswith("LoRA"):
            weight = LoRAWeight(*factor(W0, RANK))
        else:
            weight = tdlrt_layer(W0, rank_cap=RANK, r_min=RANK)
        modules += [LowRankHidden(weight, layer.bias), nn.ReLU()]
    return nn.Sequential(*modules, head)


def run(task: dict) -> dict:
    x, y, x_test, y_test = digits()
    method, lr, steps = task["method"], task["lr"], task["steps"]
    model = build(method)
    loss_fn = nn.CrossEntropyLoss()

    def closure() -> Tensor:
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    integrator = TDLRTIntegrator(model, core_optimizer="sgd") if method.startswith("TDLRT") else None
    params = integrator.other_trainable_parameters() if integrator else list(model.parameters())
    optimizer = torch.optim.Adam(params, lr=lr) if method == "LoRA-Adam" else torch.optim.SGD(params, lr=lr)
    losses: list[float] = []
    diverged = False
    start = time.perf_counter()
    for k in range(steps + 1):
        optimizer.zero_grad()
        loss = closure()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]) or losses[-1] > DIVERGENCE_FACTOR * max(losses[0], 1.0):
            diverged = True
            break
        if k == steps:
            break
        if integrator is not None:
            integrator.step(lr, closure if method == "TDLRT-BUG" else None)
            if integrator.num_skipped:
                diverged = True
                break
        optimizer.step()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).double().mean().item() if not diverged else float("nan")
    return {**task, "final_loss": losses[-1], "min_loss": float(np.nanmin(losses)), "test_accuracy": accuracy,
            "diverged": diverged, "iterations": len(losses) - 1, "seconds": time.perf_counter() - start,
            "curve": [(k, v) for k, v in enumerate(losses) if k % max(1, steps // 100) == 0]}


def table(results: list[dict], lrs: list[float]) -> str:
    lines = ["| method | " + " | ".join(f"λ={lr:g}" for lr in lrs) + " |", "|" + "---|" * (len(lrs) + 1)]
    for method in METHODS:
        cells = []
        for lr in lrs:
            r = next((x for x in results if x["method"] == method and x["lr"] == lr), None)
            if r is None:
                cells.append("–")
            elif r["diverged"]:
                cells.append(f"**div** (k={r['iterations']})")
            else:
                cells.append(f"{r['final_loss']:.2e} / {100 * r['test_accuracy']:.1f}%")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], lrs: list[float], out_dir) -> list[str]:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, style in zip(METHODS, ["k-", "C0-", "C1-", "C2-", "C3-"]):
        line = sorted((r for r in results if r["method"] == method), key=lambda r: r["lr"])
        axes[0].loglog([r["lr"] for r in line], [1e3 if r["diverged"] else r["final_loss"] for r in line],
                       style, marker="o", label=method)
        axes[1].semilogx([r["lr"] for r in line], [0 if r["diverged"] else 100 * r["test_accuracy"] for r in line],
                         style, marker="o", label=method)
    axes[0].set(xlabel="λ", ylabel="final training loss (1e3 = diverged)", title="digits MLP, rank 16")
    axes[1].set(xlabel="λ", ylabel="test accuracy % (0 = diverged)", title="digits MLP, rank 16")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "network.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path.name]
