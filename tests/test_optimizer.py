"""``TDLRTOptimizer``: same result as the hand-written integrator loop, and the optimizer protocols around it
(LR schedulers, GradScaler, accelerate, state_dict, transformers.Trainer)."""

from __future__ import annotations

import io

import pytest
import torch
from peft import get_peft_model

from tdrlt_peft import TDLRTCallback, TDLRTIntegrator, TDLRTOptimizer, TuckerAdapterConfig, adapter_ranks
from tdrlt_peft.layers.adapter import TDLRTLayer

from .helpers import MLP, tiny_deberta

LR = 0.05


def make_model(seed: int = 0, **config_kwargs):
    torch.manual_seed(seed)
    config = TuckerAdapterConfig(target_modules=["lin0", "lin1"], modules_to_save=["head"], r=2, r_max=8, tau=0.1,
                                 **config_kwargs)
    return get_peft_model(MLP(), config)


def batches(steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 10, generator=g), torch.randn(16, 3, generator=g)) for _ in range(steps)]


def loss_of(model, batch):
    x, y = batch
    return (model(x) - y).pow(2).mean()


def full_state(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (adapters at their full storage width)."""
    named = [*model.named_parameters(), *model.named_buffers()]
    return {name: t.detach().clone() for name, t in named}


def assert_same_state(a, b):
    sa, sb = full_state(a), full_state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def assert_same_function(a, b):
    """Same ΔW of every adapter and same other parameters (factors may differ by a rotation / rounding)."""
    deltas = [{name: m.get_delta_weight("default") for name, m in model.named_modules() if isinstance(m, TDLRTLayer)}
              for model in (a, b)]
    assert deltas[0].keys() == deltas[1].keys()
    for k in deltas[0]:
        torch.testing.assert_close(deltas[0][k], deltas[1][k], atol=1e-6, rtol=1e-5, msg=k)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        if "tdlrt_" not in name:
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)


def hand_written_run(model, steps, lrs=None, truncation_interval=1, total_steps=None):
    integrator = TDLRTIntegrator(model, core_optimizer="adam_factors", truncation_interval=truncation_interval)
    integrator.set_run_length(total_steps)
    other = torch.optim.AdamW(integrator.other_trainable_parameters(), lr=LR, weight_decay=0.01)
    for t, batch in enumerate(batches(steps)):
        lr = LR if lrs is None else lrs[t]
        for group in other.param_groups:
            group["lr"] = lr
        loss_of(model, batch).backward()
        integrator.step(lr)
        other.step()
        other.zero_grad()
    return model


def optimizer_run(model, steps, optimizer=None, scheduler=None):
    optimizer = optimizer or TDLRTOptimizer(model, lr=LR, weight_decay=0.01)
    for batch in batches(steps):
        loss_of(model, batch).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad()
    return model


def test_equals_the_hand_written_integrator_loop():
    expected = hand_written_run(make_model(), steps=6)
    got = optimizer_run(make_model(), steps=6)
    assert adapter_ranks(got) != {k: (2, 2) for k in adapter_ranks(got)}    # ranks moved
    assert_same_state(got, expected)


def test_param_groups_hold_every_trainable_parameter_once():
    model = make_model()
    optimizer = TDLRTOptimizer(model, lr=LR)
    grouped = [p for g in optimizer.param_groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len(set(grouped)) == len(trainable)
    assert {id(p) for p in grouped} == {id(p) for p in trainable}
    assert optimizer.param_groups[0]["tdlrt"] and "tdlrt" not in optimizer.param_groups[1]
    assert optimizer.other.param_groups[0] is optimizer.param_groups[1]    # shared dicts: schedulers reach it


def test_lr_scheduler_drives_the_adapter_lr():
    lrs = [LR * 0.5 ** t for t in range(5)]
    expected = hand_written_run(make_model(), steps=5, lrs=lrs)
    model = make_model()
    optimizer = TDLRTOptimizer(model, lr=LR, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    optimizer_run(model, steps=5, optimizer=optimizer, scheduler=scheduler)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(LR * 0.5 ** 5)
    assert_same_state(model, expected)


def test_transformers_get_scheduler_updates_group_zero():
    from transformers import get_scheduler

    optimizer = TDLRTOptimizer(make_model(), lr=LR)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=2, num_training_steps=10)
    seen = []
    for _ in range(4):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.0, LR / 2, LR, LR * 7 / 8])
    assert all(g["lr"] == optimizer.param_groups[0]["lr"] for g in optimizer.param_groups)


@pytest.mark.parametrize("where", ["adapter", "other"])
def test_grad_scaler_step_with_an_inf_gradient_changes_nothing(where):
    model = optimizer_run(make_model(), steps=2)       # non-zero adapters and Adam state first
    optimizer = TDLRTOptimizer(model, lr=LR)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    scaler.scale(loss_of(model, batches(1, seed=1)[0])).backward()
    param = optimizer.param_groups[0 if where == "adapter" else 1]["params"][0]
    param.grad.view(-1)[0] = float("inf")
    before = full_state(model)
    with pytest.warns(UserWarning, match="non-finite"):
        scaler.step(optimizer)
    scaler.update()
    after = full_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert optimizer.num_skipped == 1 and optimizer.num_steps == 0
    assert scaler.get_scale() == 2.0 ** 9
    assert all(p.grad is None for p in optimizer.param_groups[0]["params"])    # no TDLRT step is pending
    optimizer.zero_grad()
    loss_of(model, batches(1, seed=2)[0]).backward()        # training goes on
    optimizer.step()
    assert optimizer.num_steps == 1


@pytest.mark.parametrize("unscale_first", [False, True])
def test_grad_scaler_finite_step_equals_the_unscaled_step(unscale_first):
    expected = optimizer_run(make_model(), steps=3)
    model = make_model()
    optimizer = TDLRTOptimizer(model, lr=LR, weight_decay=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=1)
    for batch in batches(3):
        scaler.scale(loss_of(model, batch)).backward()
        if unscale_first:   # as before gradient clipping (Trainer, accelerate)
            scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    assert scaler.get_scale() == 2.0 ** 15      # grew every step: no step was skipped
    assert_same_state(model, expected)


def test_state_dict_round_trip_continues_identically():
    model = optimizer_run(make_model(), steps=3)
    optimizer = TDLRTOptimizer(model, lr=LR, weight_decay=0.01)
    optimizer_run(model, steps=2, optimizer=optimizer)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)      # as the Trainer does; a live state dict shares its tensors
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert state["tdlrt"] == {"num_steps": 2, "num_skipped": 0, "step_index": 2}
    assert len(state["state"]) == 2     # AdamW state of the head's weight and bias; adapter moments are buffers
    twin = make_model()
    twin.load_state_dict(model.state_dict())
    twin_optimizer = TDLRTOptimizer(twin, lr=1.0, weight_decay=0.5)     # hyperparameters come from the state
    twin_optimizer.load_state_dict(state)
    assert twin_optimizer.other.param_groups[0] is twin_optimizer.param_groups[1]
    assert twin_optimizer.other.state is twin_optimizer.state
    assert twin_optimizer.num_steps == 2
    torch.manual_seed(1)
    optimizer_run(model, steps=3, optimizer=optimizer)
    torch.manual_seed(1)
    optimizer_run(twin, steps=3, optimizer=twin_optimizer)
    assert_same_function(model, twin)


def test_total_steps_ends_an_interval_run_truncated():
    # truncation every 4 steps: steps 0 and 4 truncate, and with total_steps=6 also the last one (5)
    expected = hand_written_run(make_model(truncation_interval=4), steps=6, truncation_interval=4, total_steps=6)
    model = make_model(truncation_interval=4)
    got = optimizer_run(model, steps=6, optimizer=TDLRTOptimizer(model, lr=LR, weight_decay=0.01, total_steps=6))
    assert_same_state(got, expected)
    with pytest.warns(UserWarning, match="total_steps"):
        TDLRTOptimizer(untruncated := make_model(truncation_interval=4), lr=LR, weight_decay=0.01)
    untruncated = optimizer_run(untruncated, steps=6)   # ends after an augmenting step: more directions kept
    assert sum(map(sum, adapter_ranks(untruncated).values())) > sum(map(sum, adapter_ranks(got).values()))


def test_total_steps_resumes_the_truncation_schedule():
    expected = hand_written_run(make_model(truncation_interval=4), steps=6, truncation_interval=4, total_steps=6)
    model = make_model(truncation_interval=4)
    optimizer = TDLRTOptimizer(model, lr=LR, weight_decay=0.01, total_steps=6)
    for batch in batches(6)[:3]:
        loss_of(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    resumed = TDLRTOptimizer(model, lr=LR, weight_decay=0.01, total_steps=6)
    resumed.load_state_dict(optimizer.state_dict())
    for batch in batches(6)[3:]:
        loss_of(model, batch).backward()
        resumed.step()
        resumed.zero_grad()
    assert_same_state(model, expected)


def test_rank_freeze_fraction_needs_and_follows_total_steps():
    with pytest.raises(ValueError, match=r"rank_freeze_fraction=0.5 needs the run length.*total_steps="):
        TDLRTOptimizer(make_model(rank_freeze_fraction=0.5), lr=LR)
    with pytest.raises(ValueError, match="total_steps must be a positive int"):
        TDLRTOptimizer(make_model(), lr=LR, total_steps=0)
    model = make_model(rank_freeze_fraction=0.5)
    optimizer = TDLRTOptimizer(model, lr=LR, total_steps=8)
    history = []
    for batch in batches(8):
        loss_of(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append(adapter_ranks(model))
    assert history[0] != {k: (2, 2) for k in history[0]}    # ranks moved before the freeze
    # step 4 = ceil(0.5 * 8) takes the last decision (geometry.frozen); steps 5..7 keep its ranks
    assert all(h == history[4] for h in history[5:])


def test_zero_grad_clears_factor_gradients():
    model = make_model()
    optimizer = TDLRTOptimizer(model, lr=LR)
    loss_of(model, batches(1)[0]).backward()
    assert all(p.grad is not None for g in optimizer.param_groups for p in g["params"])
    optimizer.zero_grad()
    assert all(p.grad is None for g in optimizer.param_groups for p in g["params"])
    loss_of(model, batches(1)[0]).backward()     # no IntegratorNotRunError: nothing was pending
    optimizer.step()


def test_refuses_gradients_consumed_by_another_integrator():
    model = make_model()
    optimizer = TDLRTOptimizer(model, lr=LR)
    loss_of(model, batches(1)[0]).backward()
    TDLRTIntegrator(model).step(LR)
    with pytest.raises(RuntimeError, match="TDLRTCallback"):
        optimizer.step()


def test_accelerate_prepare_and_steps():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    expected = make_model()
    expected_optimizer = TDLRTOptimizer(expected, lr=LR, weight_decay=0.01)
    optimizer_run(expected, 4, expected_optimizer,
                  torch.optim.lr_scheduler.LambdaLR(expected_optimizer, lambda s: 1.0 / (1 + s)))
    try:
        accelerator = Accelerator(cpu=True)
        model = make_model()
        optimizer = TDLRTOptimizer(model, lr=LR, weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        for batch in batches(4):
            accelerator.backward(loss_of(model, batch))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert optimizer.optimizer.num_steps == 4
    assert_same_state(model, expected)


# ----------------------------------------------------------------- transformers.Trainer
def trainer_with_optimizer(out, callbacks=(), max_steps=8, **kw):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, get_scheduler

    torch.manual_seed(0)
    model = get_peft_model(tiny_deberta(dropout=0.0),
                           TuckerAdapterConfig(task_type="SEQ_CLS", r=2, r_max=12, tau=0.1))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (64, 12), generator=g)
    labels = (ids[:, :3].float().mean(1) > 50).long()
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})
    optimizer = TDLRTOptimizer(model, lr=1e-2)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=2, num_training_steps=max_steps)
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=16,
                             logging_steps=2, save_steps=4, report_to="none", use_cpu=True, seed=0,
                             disable_tqdm=True, **kw)
    return Trainer(model=model, args=args, train_dataset=data, callbacks=list(callbacks),
                   optimizers=(optimizer, scheduler))


@pytest.mark.integration
def test_trainer_with_optimizers_trains_and_resumes(tmp_path):
    full = trainer_with_optimizer(tmp_path / "full")
    full.train()
    inner = full.optimizer.optimizer if hasattr(full.optimizer, "optimizer") else full.optimizer
    assert isinstance(inner, TDLRTOptimizer) and inner.num_steps == 8
    assert any(r != (2, 2) for r in adapter_ranks(full.model).values())
    logged_lr = [h["learning_rate"] for h in full.state.log_history if "learning_rate" in h]
    assert len(logged_lr) == 4 and len(set(logged_lr)) > 2 and min(logged_lr) > 0    # the scheduler ran
    part = trainer_with_optimizer(tmp_path / "part")
    part.train()
    resumed = trainer_with_optimizer(tmp_path / "part")     # fresh model and optimizer, resumed at step 4
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-4"))
    resumed_inner = resumed.optimizer.optimizer if hasattr(resumed.optimizer, "optimizer") else resumed.optimizer
    assert resumed_inner.num_steps == 8
    expected = {k: v for k, v in full.model.state_dict().items() if "tdlrt_" in k}
    got = {k: v for k, v in resumed.model.state_dict().items() if "tdlrt_" in k}
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.integration
def test_trainer_refuses_optimizer_together_with_callback(tmp_path):
    trainer = trainer_with_optimizer(tmp_path, callbacks=[TDLRTCallback()], max_steps=2)
    with pytest.raises(RuntimeError, match="no TDLRTCallback"):
        trainer.train()
