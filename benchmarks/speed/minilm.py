"""The MiniLM-shaped model of the step-count targets (issue #13), with mixed adapter ranks.

``minilm_tdlrt(num_layers=6)`` is a randomly initialised ``BertForSequenceClassification`` shaped like
all-MiniLM-L6-v2 (hidden 384, 12 heads, intermediate 1536) with a TDLRT adapter on the six linears of every
encoder layer: 6 layers -> 36 adapters in 3 shapes (384x384 four times, 384->1536, 1536->384); 12 -> 72,
48 -> 288. Adapter ``i`` (in module order) starts at rank ``1 + i % distinct_ranks``, so the step sees exactly
``distinct_ranks`` ranks (1..8) unless it runs after other steps (which may change them).
"""

from __future__ import annotations

import re

import torch
from peft import get_peft_model
from torch import nn

from tdrlt_peft import TDLRTIntegrator, TuckerAdapterConfig, adapter_ranks

MINILM_L6 = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                 intermediate_size=1536, max_position_embeddings=512, num_labels=2)
# the targets; the same 6 per layer as the default BERT targets of TuckerAdapterConfig
MINILM_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
ADAPTERS_PER_LAYER = 6


def minilm(num_layers: int = 6, seed: int = 0) -> nn.Module:
    """Random-weight BertForSequenceClassification of MiniLM-L6 shape with ``num_layers`` encoder layers."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(**{**MINILM_L6, "num_hidden_layers": num_layers}))


def mixed_rank_pattern(model: nn.Module, distinct_ranks: int) -> dict[str, int]:
    """Encoder linear ``i`` (module order) -> rank ``1 + i % distinct_ranks``; keys are full module names."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".encoder.layer." in f".{n}"]
    return {re.escape(name): 1 + i % distinct_ranks for i, name in enumerate(names)}


def minilm_tdlrt(num_layers: int = 6, distinct_ranks: int = 8, r_max: int = 32, tau: float = 0.1,
                 seed: int = 0, device: torch.device | str = "cpu") -> nn.Module:
    """The PeftModel: ``6 * num_layers`` TDLRT adapters with ``distinct_ranks`` distinct ranks (1..8)."""
    if not 1 <= distinct_ranks <= 8:
        raise ValueError(f"distinct_ranks must be in 1..8, got {distinct_ranks}")
    model = minilm(num_layers, seed)
    config = TuckerAdapterConfig(task_type="SEQ_CLS", target_modules=MINILM_TARGETS, r=8, r_max=r_max, tau=tau,
                                 rank_pattern=mixed_rank_pattern(model, distinct_ranks))
    return get_peft_model(model, config).to(device)


def minilm_batch(batch_size: int = 2, seq_len: int = 16, seed: int = 0, device: torch.device | str = "cpu"
                 ) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, MINILM_L6["vocab_size"], (batch_size, seq_len), generator=g)      # (B, T)
    labels = torch.randint(0, 2, (batch_size,), generator=g)                                 # (B,)
    return {k: v.to(device) for k, v in
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}.items()}


def backward(model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    """Forward and backward: sets the adapters' (TDLRT) gradients for the next ``integrator.step``."""
    model(**batch).loss.backward()


def prepared_integrator(num_layers: int = 6, distinct_ranks: int = 8, core_optimizer: str = "adam",
                        warmup_steps: int = 0, lr: float = 1e-3, device: torch.device | str = "cpu",
                        batch_size: int = 2, seq_len: int = 16, **integrator_kwargs
                        ) -> tuple[nn.Module, TDLRTIntegrator]:
    """Model and integrator with gradients set, after ``warmup_steps`` full steps: ready for one counted step.

    The batch (``batch_size x seq_len`` random tokens) only produces the gradients. It needs at least
    ``2 * max rank`` tokens (2 x 16 = 32 for ranks up to 8): with fewer, the projected gradients are rank-deficient,
    today's engine sends those adapters to its per-adapter fallback, and the counts change.
    """
    model = minilm_tdlrt(num_layers, distinct_ranks, device=device)
    integrator = TDLRTIntegrator(model, core_optimizer=core_optimizer, **integrator_kwargs)
    batch = minilm_batch(batch_size, seq_len, device=device)
    for _ in range(warmup_steps):
        backward(model, batch)
        integrator.step(lr)
        model.zero_grad(set_to_none=True)
    backward(model, batch)
    return model, integrator


def distinct_rank_count(model: nn.Module) -> int:
    return len({r for ranks in adapter_ranks(model).values() for r in ranks})


def count_minilm_step(num_layers: int = 6, distinct_ranks: int = 8, core_optimizer: str = "adam",
                      warmup_steps: int = 0, device: torch.device | str = "cpu", batch_size: int = 2,
                      seq_len: int = 16, **integrator_kwargs) -> dict:
    """``counts.count_step`` of one integrator step on ``minilm_tdlrt(num_layers, distinct_ranks)``, with the setup.

    Adds ``num_layers, num_adapters, distinct_ranks`` (at the counted step's start), ``core_optimizer`` and
    ``warmup_steps`` to the counts.
    """
    from .counts import count_step

    model, integrator = prepared_integrator(num_layers, distinct_ranks, core_optimizer, warmup_steps,
                                            device=device, batch_size=batch_size, seq_len=seq_len,
                                            **integrator_kwargs)
    setup = {"num_layers": num_layers, "num_adapters": len(integrator.storages()),
             "distinct_ranks": distinct_rank_count(model), "core_optimizer": core_optimizer,
             "warmup_steps": warmup_steps, "grouping": integrator_kwargs.get("grouping", "auto")}
    return {**setup, **count_step(integrator, 1e-3, device)}
