"""Small builders shared by tests: dense references and tiny models (no downloads)."""

from __future__ import annotations

import torch
from torch import nn

from tdrlt_peft.layers.inventory import iter_storages


def dense_weight(storage) -> torch.Tensor:
    """W = C x_1 U_1 ... of one adapter's active slices (unscaled)."""
    from tdrlt_peft.math.tucker import tucker_to_tensor

    core, factors = storage.active()
    return tucker_to_tensor(core, factors)


def only_storage(model: nn.Module):
    storages = list(iter_storages(model))
    assert len(storages) == 1
    return storages[0]


def tangent_projection(U: torch.Tensor, V: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """P_T(G) = UU^T G + G VV^T - UU^T G VV^T (matrix manifold of fixed rank)."""
    PU, PV = U @ U.T, V @ V.T
    return PU @ G + G @ PV - PU @ G @ PV


class MLP(nn.Module):
    """A small custom (non-transformers) model: PEFT model_type "custom", targets given explicitly."""

    def __init__(self, n_in=10, hidden=20, n_out=3):
        super().__init__()
        self.lin0 = nn.Linear(n_in, hidden)
        self.act = nn.ReLU()
        self.lin1 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x):
        return self.head(self.act(self.lin1(self.act(self.lin0(x)))))


def tiny_deberta(num_labels: int = 2, seed: int = 0, dropout: float = 0.1):
    """A 2-layer DeBERTa-v2 classifier from a config (random weights, offline)."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    torch.manual_seed(seed)
    config = DebertaV2Config(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
                             pad_token_id=0, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                             pooler_dropout=dropout)
    return DebertaV2ForSequenceClassification(config)


def train_steps(model, integrator, steps: int = 3, lr: float = 0.05, seed: int = 0, n_in: int = 10):
    """A few TDLRT steps on random regression data, so that ΔW != 0 and ranks change."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, n_in, generator=g)
        loss = model(x).pow(2).mean()
        loss.backward()
        integrator.step(lr)
        model.zero_grad()
