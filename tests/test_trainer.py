"""End-to-end with transformers.Trainer on a tiny DeBERTa-v2 (random weights, raw token ids, offline)."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

from tdrlt_peft import IntegratorNotRunError, TDLRTCallback, TuckerAdapterConfig, adapter_ranks
from tdrlt_peft.layers.adapter import TDLRTLayer

from .helpers import tiny_deberta


def dataset(n=192, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, 12), generator=g)
    labels = (ids[:, :3].float().mean(1) > 50).long()   # learnable from the first tokens
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def make_trainer(out, callbacks, max_steps=24, seed=0, dropout=0.1, **kw):
    torch.manual_seed(seed)
    model = get_peft_model(tiny_deberta(seed=seed, dropout=dropout),
                           TuckerAdapterConfig(task_type="SEQ_CLS", r=2, r_max=12, tau=0.1))
    kw.setdefault("per_device_train_batch_size", 16)
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps,
                             learning_rate=1e-2, logging_steps=4, save_steps=12, report_to="none", use_cpu=True,
                             seed=seed, disable_tqdm=True, **kw)
    return Trainer(model=model, args=args, train_dataset=dataset(), callbacks=callbacks)


def adapter_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "tdlrt_" in k}


def test_trainer_trains_changes_ranks_and_logs(tmp_path):
    trainer = make_trainer(tmp_path, [TDLRTCallback()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0], losses
    ranks = adapter_ranks(trainer.model)
    assert any(r != (2, 2) for r in ranks.values()), ranks
    logged = [h for h in trainer.state.log_history if "tdlrt/mean_rank" in h]
    assert logged and logged[-1]["tdlrt/max_rank"] == max(r[0] for r in ranks.values())
    # the Trainer's optimizer holds no state for the factors: they were never stepped by it
    factors = {id(p) for m in trainer.model.modules() if isinstance(m, TDLRTLayer) for p in m.parameters()}
    assert not any(id(p) in factors for p in trainer.optimizer.state)


def test_checkpoint_resume_equals_uninterrupted_run(tmp_path):
    full = make_trainer(tmp_path / "full", [TDLRTCallback()])
    full.train()
    expected = adapter_state(full.model)

    make_trainer(tmp_path / "part", [TDLRTCallback()], max_steps=24).train()
    # resume a fresh model (initial ranks 2) from the step-12 checkpoint, whose ranks differ
    resumed = make_trainer(tmp_path / "part", [TDLRTCallback()])
    checkpoint = tmp_path / "part" / "checkpoint-12"
    saved_ranks = TuckerAdapterConfig.from_pretrained(checkpoint).rank_pattern
    assert any(r != 2 for r in saved_ranks.values()), saved_ranks
    resumed.train(resume_from_checkpoint=str(checkpoint))
    got = adapter_state(resumed.model)
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


def test_trainer_without_callback_stops_with_clear_error(tmp_path):
    trainer = make_trainer(tmp_path, [], max_steps=4)
    with pytest.raises(IntegratorNotRunError, match="TDLRTCallback"):
        trainer.train()


def test_callback_refuses_model_without_adapters(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to="none", use_cpu=True)
    trainer = Trainer(model=tiny_deberta(), args=args, train_dataset=dataset(16), callbacks=[TDLRTCallback()])
    with pytest.raises(ValueError, match="no TDLRT adapters"):
        trainer.train()


def test_gradient_accumulation_steps_once_per_optimizer_step(tmp_path):
    """With 2 micro-batches per optimizer step the integrator runs once per optimizer step, on the summed
    gradients (the factors' .grad accumulates like any gradient)."""
    callback = TDLRTCallback()
    trainer = make_trainer(tmp_path, [callback], max_steps=6, per_device_train_batch_size=8,
                           gradient_accumulation_steps=2)
    trainer.train()
    assert trainer.state.global_step == 6
    assert callback.integrator.num_steps == 6
    assert any(r != (2, 2) for r in adapter_ranks(trainer.model).values())
