"""The step engine on groups of adapters with different ranks, grouped by shape and zero-padded across shapes
(``TDLRTIntegrator(grouping=...)``), against groups of one (``grouping="adapter"``): same ranks and same tensors
to 1e-10 in float64, over several steps whose ranks change, for matrix and Tucker (conv) adapters, SGD and Adam,
with a rank-deficient and a zero gradient among same-shaped adapters."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

from tdrlt_peft import TDLRTIntegrator, TuckerAdapterConfig, adapter_ranks
from tdrlt_peft.layers import groups
from tdrlt_peft.layers.inventory import iter_storages
from tdrlt_peft.math import engine, geometry

from .tolerances import BATCHED, ORTHONORMAL

F64 = torch.float64


class Net(nn.Module):
    """Three same-shaped linears (one fed rank-one inputs, one with zero loss weight), three more shapes (one narrower
    than r_max: a smaller storage width), two convs."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.zero = (nn.Linear(10, 12) for _ in range(4))
        self.d = nn.Linear(12, 10)
        self.e = nn.Linear(10, 12)                     # other initial rank (rank_pattern): its own group
        self.f = nn.Linear(10, 4)                      # 4 < r_max: storage width 4
        self.conv1, self.conv2 = nn.Conv2d(3, 5, 3), nn.Conv2d(3, 5, 3)

    def forward(self, x, img, target, img_target):
        rank_one = x[:1].expand_as(x) * torch.linspace(-1, 1, x.shape[0], dtype=x.dtype)[:, None]
        loss = sum(((m(x) - target) ** 2).mean() for m in (self.a, self.b, self.e))
        loss = loss + ((self.c(rank_one) - target) ** 2).mean() + 0.0 * self.zero(x).sum()
        loss = loss + ((self.d(target) - x) ** 2).mean() + ((self.f(x) - target[:, :4]) ** 2).mean()
        return loss + sum(((m(img) - img_target) ** 2).mean() for m in (self.conv1, self.conv2))


def build(factorize_spatial: bool = False, random_core: bool = True):
    torch.manual_seed(0)
    config = TuckerAdapterConfig(target_modules=["a", "b", "c", "zero", "d", "e", "f", "conv1", "conv2"], r=2, r_max=5,
                                 tau=0.02, rank_pattern={"e": 3}, factorize_spatial=factorize_spatial)
    model = get_peft_model(Net().to(F64), config)
    # a random start, not ΔW = 0: Adam's first step from a zero core is -lr sign(Ĝ), whose clustered singular
    # values make the singular vectors (not W) sensitive to round-off far beyond 1e-10
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        if not random_core:
            return model
        for s in iter_storages(model):
            core = s.active()[0]
            core.copy_(torch.randn(core.shape, generator=g, dtype=F64))
    return model


def run(model, grouping: str, steps: int, core_optimizer: str, lr: float):
    integrator = TDLRTIntegrator(model, core_optimizer=core_optimizer, grouping=grouping)
    g = torch.Generator().manual_seed(1)
    history = []
    for _ in range(steps):
        x, target = torch.randn(16, 10, generator=g, dtype=F64), torch.randn(16, 12, generator=g, dtype=F64)
        img, img_target = torch.randn(4, 3, 6, 6, generator=g, dtype=F64), torch.randn(4, 5, 4, 4, generator=g,
                                                                                     dtype=F64)
        model(x, img, target, img_target).backward()
        assert integrator.step(lr)
        history.append(adapter_ranks(model))
    return history


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {name: t for name, t in [*model.named_parameters(), *model.named_buffers()] if "tdlrt_" in name}


@pytest.mark.parametrize("grouping", ["shape", "padded"])
@pytest.mark.parametrize("core_optimizer,lr", [("sgd", 1.0), ("adam", 0.1), ("adam_factors", 0.1)])
@pytest.mark.parametrize("factorize_spatial", [False, True])
def test_batched_step_equals_per_adapter_step(core_optimizer, lr, factorize_spatial, grouping, monkeypatch):
    group_ranks = []
    propose = engine.propose
    monkeypatch.setattr(engine, "propose", lambda g, *a: group_ranks.append(g.ranks.tolist()) or propose(g, *a))

    reference, fast = build(factorize_spatial), build(factorize_spatial)
    expected = run(reference, "adapter", 4, core_optimizer, lr)
    got = run(fast, grouping, 4, core_optimizer, lr)

    assert got == expected
    assert len({r for ranks in got for rs in ranks.values() for r in rs}) > 2      # ranks moved
    # groups of 3 or more adapters, some of them with different ranks within the group
    assert max(len(g) for g in group_ranks) >= (7 if grouping == "padded" else 4)
    assert any(len({tuple(r) for r in g}) > 1 for g in group_ranks)
    reference_tensors = adapter_tensors(reference)
    for name, value in adapter_tensors(fast).items():
        torch.testing.assert_close(value, reference_tensors[name], atol=BATCHED[F64], rtol=0, msg=name)
    for s in iter_storages(fast):
        for U in s.active()[1]:
            if U is not None:
                assert geometry.orthogonality_error(U.detach()) < ORTHONORMAL[F64]


def test_zero_core_keeps_the_leading_basis_columns_as_per_adapter_path():
    """lr = 0 on fresh adapters (zero cores, full gradients): every Ĉ is zero, P = I in both paths."""
    reference, fast = build(random_core=False), build(random_core=False)
    assert run(fast, "padded", 1, "sgd", 0.0) == run(reference, "adapter", 1, "sgd", 0.0)
    reference_tensors = adapter_tensors(reference)
    for name, value in adapter_tensors(fast).items():
        torch.testing.assert_close(value, reference_tensors[name], atol=BATCHED[F64], rtol=0, msg=name)


def test_adapters_are_grouped_by_shape_only():
    """Mixed ranks in one group: the 10x12 linears a, b, c, zero, e (e starts at rank 3) form one group; padded, all
    seven linears form one."""
    model = build()
    parts = groups.partition(list(iter_storages(model)))
    assert sorted(len(p) for p in parts) == [1, 1, 2, 5]
    assert sorted(len(p) for p in groups.partition(list(iter_storages(model)), "padded")) == [2, 7]


def test_padded_groups_keep_row_counts_within_the_ratio():
    sizes = [(8, 8), (8, 30), (33, 8), (40, 40), (200, 8)]
    model = nn.Sequential(*(nn.Linear(i, o) for i, o in sizes))
    model = get_peft_model(model, TuckerAdapterConfig(target_modules=[str(i) for i in range(len(sizes))], r=2,
                                                      r_max=4))
    parts = groups.partition(list(iter_storages(model)), "padded")
    rows = sorted(sorted(max(U.shape[0] for U in s.factors) for s in p) for p in parts)
    assert rows == [[8, 30], [33, 40], [200]]


def test_batched_tucker_algebra_matches_unbatched():
    from tdrlt_peft.math.tucker import batch_fold, batch_mode_dot, batch_unfold, fold, mode_dot, unfold

    g = torch.Generator().manual_seed(0)
    T = torch.randn(3, 4, 5, 6, generator=g, dtype=F64)
    M = torch.randn(3, 7, 5, generator=g, dtype=F64)
    for mode in range(3):
        for b in range(3):
            torch.testing.assert_close(batch_unfold(T, mode)[b], unfold(T[b], mode), atol=0, rtol=0)
            folded = batch_fold(batch_unfold(T, mode), mode, T.shape[1:])
            torch.testing.assert_close(folded[b], fold(unfold(T[b], mode), mode, T.shape[1:]), atol=0, rtol=0)
    for b in range(3):
        torch.testing.assert_close(batch_mode_dot(T, M, 1)[b], mode_dot(T[b], M[b], 1),
                                   atol=BATCHED[F64], rtol=0)


def test_finite_check_is_entrywise():
    from tdrlt_peft.training.integrator import all_finite as _all_finite

    huge = torch.full((3, 3), 1e30)                    # finite, but its float32 2-norm overflows
    assert _all_finite([torch.randn(4, 2), huge])
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.zeros(5, 2)
        t[3, 1] = bad
        assert not _all_finite([torch.randn(4, 2), t])
