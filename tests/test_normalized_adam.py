"""``core_optimizer="adam_normalized"``: Adam's core step divided by ``sqrt(prod_i r̂_i)`` (``engine.adam_core_update``).

One step at ``lr * sqrt(prod_i r̂_i)`` equals plain Adam's step at ``lr`` (float64, a matrix and a Tucker adapter,
the parallel and the two-pass step): the option changes the step's size and nothing else.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

import tdrlt_peft
from tdrlt_peft import TDLRTIntegrator

from .helpers import dense_weight, only_storage
from .tolerances import IDENTITY

F64 = torch.float64
SHAPES = {"linear": ((4, 10), nn.Linear(10, 12)), "conv": ((4, 3, 5, 5), nn.Conv2d(3, 6, 3, padding=1))}


def adapted(kind: str):
    torch.manual_seed(0)
    base = nn.Sequential(SHAPES[kind][1]).to(F64)
    model = get_peft_model(base, tdrlt_peft.TuckerAdapterConfig(target_modules=["0"], r=2, r_max=8, tau=0.0))
    with torch.no_grad():                      # a nonzero core: the step starts from a generic point
        core = only_storage(model).active()[0]
        core.copy_(torch.randn(core.shape, dtype=F64))
    return model


def one_step(kind: str, core_optimizer: str, lr: float, two_pass: bool):
    model = adapted(kind)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SHAPES[kind][0], dtype=F64, generator=g)
    y = torch.randn(model(x).shape, dtype=F64, generator=g)

    def closure():
        loss = 0.5 * ((model(x) - y) ** 2).sum()
        loss.backward()
        return loss

    closure()
    TDLRTIntegrator(model, core_optimizer=core_optimizer).step(lr, closure if two_pass else None)
    return only_storage(model)


@pytest.mark.parametrize("two_pass", [False, True], ids=["parallel", "bug"])
@pytest.mark.parametrize("kind", list(SHAPES))
def test_normalized_step_is_plain_adam_at_the_rank_scaled_rate(kind, two_pass):
    lr = 1e-2
    plain = one_step(kind, "adam", lr, two_pass)
    # at tau = 0 the step keeps the augmented ranks: prod_i r̂_i is the active core's size
    size = plain.active()[0].numel()
    assert size > 4 * (9 if kind == "conv" else 1), "the step must have augmented the rank-2 adapter"
    normalized = one_step(kind, "adam_normalized", lr * size ** 0.5, two_pass)
    torch.testing.assert_close(dense_weight(normalized), dense_weight(plain), atol=IDENTITY[F64], rtol=0)
    assert not torch.allclose(dense_weight(one_step(kind, "adam_normalized", lr, two_pass)), dense_weight(plain))


def test_config_names_the_normalized_core_optimizer():
    assert tdrlt_peft.TuckerAdapterConfig(core_optimizer="adam_normalized").core_optimizer == "adam_normalized"
    with pytest.raises(ValueError, match="adam_normalized"):
        tdrlt_peft.TuckerAdapterConfig(core_optimizer="adamw")
