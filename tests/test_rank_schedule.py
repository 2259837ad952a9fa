"""Ranks that keep adapting: ``truncation_interval`` and ``rank_freeze_fraction`` (float64, synthetic, fast)."""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model
from torch import nn

from tdrlt_peft import TDLRTCallback, TDLRTIntegrator, TuckerAdapterConfig, adapter_ranks
from tdrlt_peft.layers.adapter import Linear
from tdrlt_peft.layers.inventory import iter_storages
from tdrlt_peft.math.geometry import freeze_step, frozen, truncates

from .helpers import dense_weight, only_storage, tangent_projection, tiny_deberta
from .test_batched_step import Net
from .tolerances import IDENTITY

F64 = torch.float64


def make_layer(n_out=12, n_in=10, r=1, r_max=8, tau=0.1, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(n_in, n_out, bias=False).to(F64)
    base.weight.data.zero_()                      # ΔW itself learns the target
    base.weight.requires_grad_(False)
    return Linear(base, "default", r=r, r_min=1, r_max=r_max, tau=tau, scale=1.0)


def test_schedule_functions():
    assert [truncates(t, 3) for t in range(7)] == [True, False, False, True, False, False, True]
    assert all(truncates(t, 1) for t in range(5))
    assert truncates(4, 3, total_steps=5)          # the last step always truncates
    assert freeze_step(0.25, 10) == 3 and freeze_step(None, 10) is None
    assert not frozen(3, 3) and frozen(4, 3) and not frozen(100, None)
    assert not frozen(2, 3, interval=2) and frozen(3, 3, interval=2)     # step 2 is the last tau decision
    with pytest.raises(ValueError, match="truncation_interval"):
        truncates(0, 0)


def test_step_between_truncations_is_the_exact_projected_step():
    """A step that does not truncate (tau > 0, interval 2, step 1) is exactly ``W - lr P_T(G)`` (rank 2r)."""
    layer = make_layer(r=3, tau=0.3)
    with torch.no_grad():
        layer.tdlrt_S["default"][:3, :3] = torch.randn(3, 3, dtype=F64)
    integrator = TDLRTIntegrator(layer, core_optimizer="sgd", truncation_interval=2)
    integrator.step_index = 1
    s = only_storage(layer)
    U, V = (M.detach().clone() for M in s.active()[1])
    W = dense_weight(s).detach().clone().requires_grad_(True)
    x, target = torch.randn(9, 10, dtype=F64), torch.randn(9, 12, dtype=F64)
    (0.5 * ((x @ W.T - target) ** 2).sum()).backward()
    (0.5 * ((layer(x) - target) ** 2).sum()).backward()
    assert integrator.step(0.05)
    expected = W.detach() - 0.05 * tangent_projection(U, V, W.grad)
    torch.testing.assert_close(dense_weight(only_storage(layer)), expected, atol=IDENTITY[F64], rtol=0)
    assert adapter_ranks(layer)[""] == (6, 6)


def train_switching_target(interval: int, steps: int = 120, lr: float = 0.05):
    """SGD on a target of rank 2 that gains a third direction (singular value 3) at half time; returns the rank
    after every step and the final loss against the float64 reference target."""
    g = torch.Generator().manual_seed(0)
    Uo, _ = torch.linalg.qr(torch.randn(12, 3, generator=g, dtype=F64))
    Vo, _ = torch.linalg.qr(torch.randn(10, 3, generator=g, dtype=F64))
    W1 = Uo[:, :2] @ torch.diag(torch.tensor([4.0, 3.0], dtype=F64)) @ Vo[:, :2].T
    W2 = W1 + 3.0 * Uo[:, 2:] @ Vo[:, 2:].T
    layer = make_layer()
    integrator = TDLRTIntegrator(layer, core_optimizer="sgd", truncation_interval=interval)
    integrator.total_steps = steps
    ranks = []
    for t in range(steps):
        W = W1 if t < steps // 2 else W2
        x = torch.randn(32, 10, generator=g, dtype=F64)
        (0.5 * ((layer(x) - x @ W.T) ** 2).sum() / 32).backward()
        truncated = truncates(t, interval, steps)
        integrator.step(lr)
        ranks.append(adapter_ranks(layer)[""][0] if truncated else None)
    error = (dense_weight(only_storage(layer)) - W2).norm() / W2.norm()
    return ranks, error.item()


def test_interval_lets_a_late_direction_in_where_every_step_truncation_freezes():
    every, every_error = train_switching_target(interval=1)
    assert set(every[10:]) == {2}                  # frozen at rank 2: the new direction never enters
    assert every_error > 0.4                       # ... so the third direction (3 of ||W2|| ~ 5.8) is missing
    spaced, spaced_error = train_switching_target(interval=4)
    judged = [(t, r) for t, r in enumerate(spaced) if r is not None]
    assert any(t >= 60 and r == 3 for t, r in judged), judged    # grows after the target changed
    assert judged[-1][1] == 3
    assert spaced_error < 0.05                     # and fits the new target


def test_frozen_ranks_stay_while_the_weights_train():
    layer = make_layer(r=2)
    integrator = TDLRTIntegrator(layer, core_optimizer="sgd")
    integrator.freeze_step = 3
    g = torch.Generator().manual_seed(1)
    target = torch.randn(12, 10, generator=g, dtype=F64)
    ranks, weights = [], []
    for _ in range(8):
        x = torch.randn(32, 10, generator=g, dtype=F64)
        (0.5 * ((layer(x) - x @ target.T) ** 2).sum() / 32).backward()
        integrator.step(0.05)
        ranks.append(adapter_ranks(layer)[""])
        weights.append(dense_weight(only_storage(layer)).detach().clone())
    assert ranks[0] != (2, 2) and len(set(ranks[:3])) > 1    # adapting before the freeze
    assert len(set(ranks[3:])) == 1                          # decided at step index 3, then kept
    assert all((a - b).norm() > 0 for a, b in zip(weights[2:], weights[3:]))


def test_callback_freezes_ranks_after_the_fraction(tmp_path):
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (128, 12), generator=g)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] > 50).long().tolist()})
    torch.manual_seed(0)
    config = TuckerAdapterConfig(task_type="SEQ_CLS", r=2, r_max=12, tau=0.1, truncation_interval=2,
                                 rank_freeze_fraction=0.5)
    model = get_peft_model(tiny_deberta(), config)

    class Record(TrainerCallback):
        seen: list = []

        def on_step_end(self, args, state, control, **kwargs):
            self.seen.append((state.global_step, adapter_ranks(model)))

    max_steps = 12
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, learning_rate=1e-2, report_to="none",
                             use_cpu=True, per_device_train_batch_size=16, disable_tqdm=True, save_strategy="no")
    record = Record()
    Trainer(model=model, args=args, train_dataset=data, callbacks=[TDLRTCallback(), record]).train()
    # freeze_step ceil(0.5 x 12) = 6 is a truncation step (interval 2): its decision is the last one, and the
    # Trainer counts it as global step 7 (an odd freeze step would take the decision of the step before)
    last_decision = math.ceil(0.5 * max_steps) + 1
    before = [r for step, r in record.seen if step <= last_decision]
    after = [r for step, r in record.seen if step >= last_decision]
    assert len({tuple(sorted(r.items())) for r in before}) > 1   # ranks moved before
    assert len({tuple(sorted(r.items())) for r in after}) == 1   # and not after


@pytest.mark.parametrize("field,value", [("truncation_interval", 0), ("truncation_interval", 1.5),
                                         ("rank_freeze_fraction", 0.0), ("rank_freeze_fraction", 1.5)])
def test_config_refuses_bad_schedule(field, value):
    with pytest.raises(ValueError, match=field):
        TuckerAdapterConfig(**{field: value})


def test_rank_recorder_counts_late_changes(tmp_path):
    from benchmarks.rank_history import RankRecorder, plot_rank_history

    recorder = RankRecorder({"a": [2, 2], "b": [3, 3]}, 10, every=5)
    for step, ranks in enumerate([{"a": [3, 3], "b": [3, 3]}] * 2 + [{"a": [3, 3], "b": [4, 4]}] * 18, start=1):
        recorder.observe(step, ranks, 10, record=step == 20)
    summary = recorder.summary(total_steps=20)
    assert summary["rank_changes"] == [[1, "a", [2, 2], [3, 3]], [3, "b", [3, 3], [4, 4]]]
    assert summary["rank_changes_after_10pct"] == 1 and summary["rank_changes_after_25pct"] == 0
    assert [h["step"] for h in summary["rank_history"]] == [0, 1, 3, 5, 10, 15, 20]
    assert plot_rank_history(summary["rank_history"], "t", tmp_path / "r.png").stat().st_size > 0


@pytest.mark.parametrize("grouping", ["adapter", "shape", "padded"])
@pytest.mark.parametrize("core_optimizer", ["sgd", "adam", "adam_factors"])
@pytest.mark.parametrize("budget", [False, True])
def test_step_of_learning_rate_zero_keeps_ranks_and_weights(grouping, core_optimizer, budget):
    """The Trainer's linear warm-up makes the first optimizer step one of learning rate 0. From fresh adapters
    (ΔW = 0) every augmented core is then zero: the step must change nothing, ranks included (it used to send every
    adapter to r_min, so the configured r never mattered), and the next step must start from those ranks."""
    torch.manual_seed(0)
    targets = ["a", "b", "c", "zero", "d", "e", "f", "conv1", "conv2"]
    config = TuckerAdapterConfig(target_modules=targets, r=2, r_max=5, tau=0.02, rank_pattern={"e": 3},
                                 target_params=900 if budget else None)
    model = get_peft_model(Net().to(F64), config)
    integrator = TDLRTIntegrator(model, core_optimizer=core_optimizer, grouping=grouping)
    before_ranks = adapter_ranks(model)
    before = [dense_weight(s).clone() for s in iter_storages(model)]
    assert len(set(before_ranks.values())) > 1 and all(min(r) > 1 for r in before_ranks.values())
    g = torch.Generator().manual_seed(1)
    batch = [torch.randn(16, 10, generator=g, dtype=F64), torch.randn(4, 3, 6, 6, generator=g, dtype=F64),
             torch.randn(16, 12, generator=g, dtype=F64), torch.randn(4, 5, 4, 4, generator=g, dtype=F64)]
    model(*batch).backward()
    assert integrator.step(0.0)
    assert adapter_ranks(model) == before_ranks
    for i, (s, expected) in enumerate(zip(iter_storages(model), before)):
        torch.testing.assert_close(dense_weight(s), expected, atol=IDENTITY[F64], rtol=0, msg=f"adapter {i}")
    model.zero_grad()
    model(*batch).backward()
    assert integrator.step(0.1)
    assert adapter_ranks(model) != before_ranks                   # a real step still decides ranks
