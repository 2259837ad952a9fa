"""The cached adapter walk (``layers/inventory.py``): reused while the tree holds, redone when it changes."""

import copy

import pytest
import torch
from peft import get_peft_model
from torch import nn

import tdrlt_peft
from tdrlt_peft.layers.inventory import adapter_modules, iter_storages


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(5, 6)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.c = nn.Linear(6, 3)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.c(x)


def walked(model: nn.Module) -> list[str]:
    """The reference: a fresh walk of the whole tree."""
    return [n for n, m in model.named_modules() if hasattr(type(m), "tdlrt_storages")]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return get_peft_model(Net(), tdrlt_peft.TuckerAdapterConfig(r=2, target_modules=["a", "b"]))


def names(model) -> list[str]:
    return [n for n, _ in adapter_modules(model)]


def test_second_call_reuses_the_walk(model, monkeypatch):
    first = names(model)
    assert first == walked(model) and len(first) == 4

    def no_walk(*args, **kwargs):
        raise AssertionError("walked the tree again")

    monkeypatch.setattr(type(model), "named_modules", no_walk)
    assert names(model) == first
    assert len(list(iter_storages(model))) == 4


def test_a_layer_replaced_by_its_base_is_dropped(model):
    names(model)
    block = model.base_model.model.blocks[0]
    block.a = block.a.get_base_layer()                      # what PEFT's unload does
    assert names(model) == walked(model) and len(names(model)) == 3


def test_a_replaced_subtree_is_noticed(model):
    names(model)
    model.base_model.model.blocks[1] = Block()              # plain block: its two adapters leave the model
    assert names(model) == walked(model) and len(names(model)) == 2
    assert all(".blocks.0." in n for n in names(model))


def test_a_new_adapter_layer_is_found(model):
    names(model)
    model.add_adapter("second", tdrlt_peft.TuckerAdapterConfig(r=2, target_modules=["c"]))
    assert names(model) == walked(model) and len(names(model)) == 5
    assert [s.name for s in iter_storages(model, "second")] == [n for n in names(model) if n.endswith(".c")]


def test_a_deep_copied_block_is_found(model):
    names(model)
    blocks = model.base_model.model.blocks
    blocks.append(copy.deepcopy(blocks[0]))                # no layer __init__ runs: __setstate__ counts it
    assert names(model) == walked(model) and len(names(model)) == 6


def test_the_integrator_steps_only_the_adapters_in_the_model(model):
    integrator = tdrlt_peft.TDLRTIntegrator(model)
    model(torch.randn(4, 6)).square().sum().backward()       # every adapter has a gradient
    removed = model.base_model.model.blocks[0].a
    kept = model.base_model.model.blocks[1].a
    model.base_model.model.blocks[0].a = removed.get_base_layer()
    before = {m: m.tdlrt_S["default"].detach().clone() for m in (removed, kept)}
    integrator.step(0.1)
    assert torch.equal(removed.tdlrt_S["default"], before[removed])      # no longer in the model: not stepped
    assert not torch.equal(kept.tdlrt_S["default"], before[kept])
