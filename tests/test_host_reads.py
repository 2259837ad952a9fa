"""The integrator step reads nothing on the host: run it on the ``meta`` device, where every host read
(``.item()``, ``bool()``/``int()``/``float()`` of a tensor, ``.tolist()``, ``.cpu()``, ``nonzero``, boolean-mask
indexing) raises, for matrix and Tucker-conv adapters, with the Adam and the SGD core, in tau and in budget mode."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

from tdrlt_peft import TDLRTIntegrator, TuckerAdapterConfig
from tdrlt_peft.layers.inventory import iter_storages


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(10, 12), nn.Linear(10, 12)
        self.c = nn.Linear(12, 6)
        self.conv = nn.Conv2d(3, 5, 3)
        self.conv1x1 = nn.Conv2d(5, 4, 1)


def meta_model(factorize_spatial: bool, target_params: int | None = None):
    torch.manual_seed(0)
    config = TuckerAdapterConfig(target_modules=["a", "b", "c", "conv", "conv1x1"], r=2, r_max=5,
                                 rank_pattern={"b": 3}, factorize_spatial=factorize_spatial,
                                 target_params=target_params)
    return get_peft_model(Net(), config).to("meta")


def test_meta_device_really_refuses_host_reads():
    t = torch.ones(3, device="meta")
    for read in (lambda: t.sum().item(), lambda: bool(t.sum()), lambda: t.tolist(), lambda: t.nonzero(),
                 lambda: t[t > 0], lambda: t.cpu()):
        with pytest.raises((RuntimeError, NotImplementedError)):
            read()


@pytest.mark.parametrize("target_params", [None, 300])   # 300: budget mode (layers/budget.py)
@pytest.mark.parametrize("grouping", ["shape", "padded"])
@pytest.mark.parametrize("core_optimizer", ["adam", "adam_factors", "sgd"])
@pytest.mark.parametrize("factorize_spatial", [False, True])
def test_integrator_step_has_no_host_read(core_optimizer, factorize_spatial, grouping, target_params):
    model = meta_model(factorize_spatial, target_params)
    integrator = TDLRTIntegrator(model, core_optimizer=core_optimizer, grouping=grouping)
    storages = list(iter_storages(model))
    assert len(storages) == 5 and storages[0].core.device.type == "meta"
    for _ in range(2):
        for s in storages:
            for p in s.parameters():
                p.grad = torch.zeros_like(p)
        ok = integrator.step(0.1)
        assert ok.device.type == "meta"
        assert all(p.grad is None for s in storages for p in s.parameters())


def test_cuda_graph_refuses_a_cpu_model_with_the_fix():
    model = get_peft_model(Net(), TuckerAdapterConfig(target_modules=["a"], r=2, r_max=5))
    with pytest.raises(ValueError, match="needs the adapters on a CUDA device.*cuda_graph=False"):
        TDLRTIntegrator(model, cuda_graph=True)
