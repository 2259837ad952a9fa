"""Reliability: mixed precision, non-finite steps, runs killed while saving, mismatched adapters and bad input.

Mixed-precision tests run on CPU (bf16 autocast; fp16 with a ``torch.amp.GradScaler``) and, where a GPU is
present, again on CUDA with the Trainer's own fp16/bf16 machinery (``-k cuda``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTuner
from torch import nn
from transformers import TrainerCallback, TrainingArguments

from tdrlt_peft import TDLRTCallback, TDLRTIntegrator, TuckerAdapterConfig, adapter_ranks
from tdrlt_peft.layers.inventory import iter_storages
from tdrlt_peft.math.geometry import orthogonality_error
from tdrlt_peft.training.checkpoint import (
    MARKER,
    IncompleteCheckpointError,
    last_complete_checkpoint,
    verify_checkpoint,
)
from tdrlt_peft.tuner.load_checks import AdapterMismatchError

from .helpers import MLP, train_steps
from .scripts.tiny_trainer import adapter_state, build_trainer, subprocess_env, tiny_model
from .tolerances import ORTHONORMAL

SCRIPTS = Path(__file__).parent / "scripts"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
X = torch.randn(6, 10, generator=torch.Generator().manual_seed(1))


def full_state(model) -> dict[str, torch.Tensor]:
    """Every tensor of the model (parameters and buffers: ranks, Adam moments), cloned."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"changed: {changed[:5]}"


class LinalgSpy:
    """Records the dtype of every QR / SVD / eigh input while active (patches ``torch.linalg``)."""

    def __init__(self, monkeypatch):
        self.dtypes: list[torch.dtype] = []
        for name in ("qr", "svd", "eigh"):
            original = getattr(torch.linalg, name)

            def spy(A, *args, _original=original, **kwargs):
                self.dtypes.append(A.dtype)
                return _original(A, *args, **kwargs)

            monkeypatch.setattr(torch.linalg, name, spy)


# --------------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("device", DEVICES)
def test_bf16_trainer_trains_with_float32_linear_algebra(tmp_path, monkeypatch, device):
    trainer = build_trainer(tmp_path, max_steps=6, bf16=True, use_cpu=device == "cpu")
    spy = LinalgSpy(monkeypatch)
    trainer.train()
    assert spy.dtypes and set(spy.dtypes) == {torch.float32}, set(spy.dtypes)
    assert any(r != (2, 2) for r in adapter_ranks(trainer.model).values())
    for storage in iter_storages(trainer.model):
        core, factors = storage.active()
        assert core.dtype == torch.float32 and bool(torch.isfinite(core).all())
        assert all(orthogonality_error(U) <= ORTHONORMAL[torch.float32] for U in factors)


def test_bf16_weights_keep_float32_adapters_and_linear_algebra(monkeypatch):
    model = tiny_model(dtype=torch.bfloat16)
    storages = list(iter_storages(model))
    assert all(p.dtype == torch.float32 for s in storages for p in s.parameters())
    integrator = TDLRTIntegrator(model)
    ids = torch.randint(1, 100, (4, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    spy = LinalgSpy(monkeypatch)
    assert integrator.step(1e-2)
    assert spy.dtypes and set(spy.dtypes) == {torch.float32}
    assert all(orthogonality_error(U) <= ORTHONORMAL[torch.float32] for s in storages for U in s.active()[1])


def _fill_grad_with_inf(parameter: torch.Tensor) -> None:
    parameter.grad.fill_(float("inf"))


class InjectInf(TrainerCallback):
    """At optimizer step ``step``: one gradient becomes inf; records the model before and after that step."""

    def __init__(self, step: int, parameter_name: str):
        self.step, self.parameter_name = step, parameter_name
        self.before = self.after = None
        self.scales: list[float] = []   # loss scale after each step: it halves when the scaler skips a step
        self.handle = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            self.before = full_state(model)
            parameter = dict(model.named_parameters())[self.parameter_name]
            self.handle = parameter.register_post_accumulate_grad_hook(_fill_grad_with_inf)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.scales.append(self.trainer.accelerator.scaler.get_scale())
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
            self.after = full_state(model)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("where", ["head", "adapter"])
def test_fp16_overflow_skips_the_whole_step(tmp_path, device, where):
    """fp16 with the Trainer's GradScaler: an inf in one gradient makes the scaler skip the optimizer step, and the
    integrator must skip too (the model is unchanged by that step), then training goes on.

    accelerate creates no GradScaler on CPU (``fp16=True`` silently trains in float32 there), so on CPU the test
    installs ``torch.amp.GradScaler("cpu")`` in the Trainer's accelerator; on CUDA it is the Trainer's own."""
    model = tiny_model()
    name = next(n for n in dict(model.named_parameters())
                if ("classifier.modules_to_save" in n if where == "head" else "query_proj.tdlrt_U" in n))
    inject = InjectInf(step=3, parameter_name=name)
    trainer = build_trainer(tmp_path, max_steps=5, fp16=True, model=model, callbacks=[inject],
                            use_cpu=device == "cpu")
    inject.trainer = trainer
    if device == "cpu":
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        trainer.accelerator.native_amp = True
    integrator_callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, TDLRTCallback))
    with pytest.warns(UserWarning, match="non-finite gradients"):
        trainer.train()
    # (accelerate's optimizer_step_was_skipped cannot see a skip inside the Trainer's fused AdamW: read the scale)
    halved = [later < earlier for earlier, later in zip(inject.scales, inject.scales[1:])]
    assert halved == [False, True, False, False], inject.scales
    assert_same_state(inject.before, inject.after)
    assert integrator_callback.integrator.num_skipped == 1 and integrator_callback.integrator.num_steps == 4
    assert all(torch.isfinite(v).all() for v in adapter_state(trainer.model).values())


def test_callback_unscales_fp16_gradients_itself():
    """transformers < 5.24 unscales fp16 gradients before ``on_pre_optimizer_step`` only when gradient clipping is
    on: the callback then unscales them itself. Driven by hand with a GradScaler and accelerate's optimizer wrapper
    (SGD core, so a forgotten 1/scale would show): the result equals that of gradients unscaled beforehand."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    Accelerator(cpu=True)   # AcceleratedOptimizer reads the accelerate state

    def run(unscale_before_callback: bool, inf_at: int | None = None):
        torch.manual_seed(0)
        model = get_peft_model(MLP(), TuckerAdapterConfig(target_modules=["lin0", "lin1"], r=2, r_max=8,
                                                          core_optimizer="sgd", modules_to_save=["head"]))
        callback = TDLRTCallback()
        callback.on_train_begin(SimpleNamespace(deepspeed=None, fsdp=None), None, None, model=model)
        inner = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        optimizer = AcceleratedOptimizer(inner, device_placement=False, scaler=scaler)
        g = torch.Generator().manual_seed(0)
        states = []
        for step in range(3):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = model(torch.randn(16, 10, generator=g)).float().pow(2).mean()
            scaler.scale(loss).backward()
            if step == inf_at:
                model.base_model.model.head.modules_to_save["default"].weight.grad.fill_(float("inf"))
            if unscale_before_callback:
                scaler.unscale_(inner)
            before = full_state(model)
            callback.on_pre_optimizer_step(None, None, None, optimizer=optimizer)
            optimizer.step()
            optimizer.zero_grad()
            states.append((before, full_state(model), optimizer.step_was_skipped))
        return states, callback.integrator

    by_callback, _ = run(unscale_before_callback=False)
    beforehand, _ = run(unscale_before_callback=True)
    assert_same_state(by_callback[-1][1], beforehand[-1][1])
    assert not any(skipped for _, _, skipped in by_callback)

    with pytest.warns(UserWarning, match="non-finite gradients"):
        overflowed, integrator = run(unscale_before_callback=False, inf_at=1)
    before, after, skipped = overflowed[1]
    assert skipped and integrator.num_skipped == 1
    assert_same_state(before, after)


# --------------------------------------------------------------------- non-finite input
def test_nan_input_skips_the_step_with_a_warning():
    torch.manual_seed(0)
    model = get_peft_model(MLP(), TuckerAdapterConfig(target_modules=["lin0", "lin1"], r=2, r_max=8))
    integrator = TDLRTIntegrator(model)
    train_steps(model, integrator, steps=2)   # ranks and Adam moments are not trivial any more
    before = full_state(model)
    bad = X.clone()
    bad[2, 3] = float("nan")
    model(bad).pow(2).mean().backward()
    assert not integrator.step(0.05)          # decided on the device: a 0-dim bool tensor
    assert_same_state(before, full_state(model))
    with pytest.warns(UserWarning, match="non-finite"):  # said once the host sees it (next forward or count)
        assert integrator.num_skipped == 1
    assert all(p.grad is None for s in iter_storages(model) for p in s.parameters())
    train_steps(model, integrator, steps=1)   # and training goes on
    assert integrator.num_steps == 3


def test_nan_batch_under_the_trainer_leaves_the_adapters_unchanged(tmp_path):
    """A NaN in the activations of one batch (float32 Trainer): that step changes no adapter tensor."""
    model = tiny_model()
    embeddings = model.base_model.model.deberta.embeddings
    state = {"step": 0}

    class Poison(TrainerCallback):
        def on_step_begin(self, args, trainer_state, control, model=None, **kwargs):
            state["step"] = trainer_state.global_step + 1
            if state["step"] == 2:
                self.before = adapter_state(model)

        def on_step_end(self, args, trainer_state, control, model=None, **kwargs):
            if state["step"] == 2:
                self.after = adapter_state(model)

    embeddings.register_forward_hook(lambda m, i, out: out * float("nan") if state["step"] == 2 else out)
    poison = Poison()
    trainer = build_trainer(tmp_path, max_steps=2, model=model, callbacks=[poison])
    with pytest.warns(UserWarning, match="non-finite"):
        trainer.train()
    tdlrt = {k: v for k, v in poison.before.items() if "tdlrt_" in k}
    assert_same_state(tdlrt, {k: poison.after[k] for k in tdlrt})


# --------------------------------------------------------------------- faults: killed runs, partial checkpoints
def test_run_killed_while_saving_resumes_from_last_complete_checkpoint(tmp_path):
    out = tmp_path / "killed"
    result = subprocess.run([sys.executable, str(SCRIPTS / "killed_run.py"), str(out), "--kill-step", "8",
                             "--kill-file", "optimizer.pt"], env=subprocess_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    partial = out / "checkpoint-8"
    assert partial.is_dir() and not (partial / MARKER).exists() and not (partial / "trainer_state.json").exists()
    with pytest.raises(IncompleteCheckpointError, match=MARKER):
        verify_checkpoint(partial)
    with pytest.warns(UserWarning, match="skipping checkpoint-8"):
        resume = last_complete_checkpoint(out)
    assert resume == str(out / "checkpoint-4")
    saved_ranks = verify_checkpoint(resume)["ranks"]

    # the Trainer's own choice (resume_from_checkpoint=True) is the partial checkpoint, and it fails
    with pytest.raises(FileNotFoundError, match="checkpoint-8"):
        build_trainer(out, max_steps=12, save_strategy="steps", save_steps=4).train(resume_from_checkpoint=True)

    class RanksAtStart(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.ranks = {name.removeprefix("base_model.model."): list(r) for name, r in adapter_ranks(model).items()}
            self.step = state.global_step

    probe = RanksAtStart()
    resumed = build_trainer(out, max_steps=12, save_strategy="steps", save_steps=4, callbacks=[probe])
    resumed.train(resume_from_checkpoint=resume)
    assert probe.step == 4 and probe.ranks == saved_ranks
    assert any(r != [2, 2] for r in saved_ranks.values())   # ranks moved before the checkpoint
    uninterrupted = build_trainer(tmp_path / "full", max_steps=12, save_strategy="steps", save_steps=4)
    uninterrupted.train()
    expected, got = adapter_state(uninterrupted.model), adapter_state(resumed.model)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert last_complete_checkpoint(out) == str(out / "checkpoint-12")
    for step in (4, 8, 12):
        verify_checkpoint(out / f"checkpoint-{step}")


@pytest.fixture(scope="module")
def saved_checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("checkpoints")
    build_trainer(out, max_steps=8, save_strategy="steps", save_steps=4).train()
    return out


@pytest.mark.parametrize("damage", ["truncate:adapter_model.safetensors", "truncate:optimizer.pt",
                                    "delete:trainer_state.json", "delete:rng_state.pth", "delete:adapter_config.json",
                                    f"delete:{MARKER}", f"truncate:{MARKER}"])
def test_damaged_checkpoint_is_detected_and_skipped(saved_checkpoints, tmp_path, damage):
    action, name = damage.split(":")
    out = tmp_path / "out"
    shutil.copytree(saved_checkpoints, out)
    assert last_complete_checkpoint(out) == str(out / "checkpoint-8")
    path = out / "checkpoint-8" / name
    if action == "delete":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(IncompleteCheckpointError, match=MARKER if name == MARKER else name.replace(".", r"\.")):
        verify_checkpoint(out / "checkpoint-8")
    with pytest.warns(UserWarning, match="skipping checkpoint-8"):
        assert last_complete_checkpoint(out) == str(out / "checkpoint-4")


class _FirstStep(TrainerCallback):
    def __init__(self):
        self.first = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.first is None:
            self.first = state.global_step


def test_tdlrt_trainer_resume_true_takes_the_last_complete_checkpoint(saved_checkpoints, tmp_path):
    """transformers' ``resume_from_checkpoint=True`` takes the newest folder, complete or not; TDLRTTrainer's
    takes the newest complete one."""
    out = tmp_path / "out"
    shutil.copytree(saved_checkpoints, out)
    (out / "checkpoint-8" / MARKER).unlink()                  # as if the run died while writing checkpoint-8
    first = _FirstStep()
    trainer = build_trainer(out, max_steps=8, save_strategy="no", callbacks=[first], tdlrt_trainer=True)
    with pytest.warns(UserWarning, match="skipping checkpoint-8"):
        trainer.train(resume_from_checkpoint=True)
    assert first.first == 4 and trainer.state.global_step == 8
    empty = build_trainer(tmp_path / "empty", max_steps=8, tdlrt_trainer=True)
    with pytest.raises(ValueError, match="no complete checkpoint"):
        empty.train(resume_from_checkpoint=True)


# --------------------------------------------------------------------- faults: adapters that do not fit
@pytest.fixture()
def saved_adapter(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(MLP(), TuckerAdapterConfig(target_modules=["lin0", "lin1"], r=2, r_max=8))
    train_steps(model, TDLRTIntegrator(model))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_adapter_into_other_layer_shapes_fails_naming_the_module(saved_adapter):
    with pytest.raises(RuntimeError, match=r"lin0: tdlrt_V has shape \(10, \d+\), expected \(12, \d+\)"):
        PeftModel.from_pretrained(MLP(n_in=12), saved_adapter)


# the module check runs in peft's per-tuner load hook (TDLRTModel._remap_adapter_state_dict_for_load), peft >= 0.21
needs_load_hook = pytest.mark.skipif(not hasattr(BaseTuner, "_remap_adapter_state_dict_for_load"),
                                     reason="peft < 0.21 has no per-tuner load hook")


class MLPWithoutLin1(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin2 = nn.Linear(20, 3)

    def forward(self, x):
        return self.lin2(self.lin0(x))


@needs_load_hook
def test_adapter_into_other_architecture_fails_naming_the_modules(saved_adapter):
    with pytest.warns(RuntimeWarning), pytest.raises(AdapterMismatchError, match="no adapter on: lin1"):
        PeftModel.from_pretrained(MLPWithoutLin1(), saved_adapter)


@needs_load_hook
@pytest.mark.parametrize("targets,message", [(["lin0", "lin1", "head"], "missing from the checkpoint: head"),
                                             (["lin0"], "no adapter on: lin1")])
def test_adapter_with_other_target_modules_fails_and_changes_nothing(saved_adapter, targets, message):
    """The Trainer-resume path (``load_adapter`` into the live adapter)."""
    torch.manual_seed(1)
    live = get_peft_model(MLP(), TuckerAdapterConfig(target_modules=targets, r=2, r_max=8))
    before = full_state(live)
    with pytest.raises(AdapterMismatchError, match=message):
        live.load_adapter(saved_adapter, "default", is_trainable=True)
    assert_same_state(before, full_state(live))


# --------------------------------------------------------------------- bad input
@pytest.fixture()
def restored_environment():
    """TrainingArguments(fsdp=...) writes ACCELERATE_USE_FSDP & co. into os.environ: keep them out of later tests."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])
def test_deepspeed_and_fsdp_are_refused(engine, restored_environment):
    if engine == "fsdp":   # the Trainer itself refuses FSDP without torch.distributed: call the callback directly
        args = TrainingArguments(output_dir="unused", use_cpu=True, fsdp="full_shard", report_to="none")
    else:                  # deepspeed is not installed here: TrainingArguments(deepspeed=...) would not build
        args = SimpleNamespace(deepspeed={"zero_optimization": {"stage": 2}}, fsdp=None)
    model = tiny_model()
    before = full_state(model)
    callback = TDLRTCallback()
    with pytest.raises(ValueError, match="does not support DeepSpeed or FSDP"):
        callback.on_train_begin(args, None, None, model=model)
    assert callback.integrator is None
    assert_same_state(before, full_state(model))


def test_grouped_convolution_is_refused_and_the_model_is_unchanged():
    model = nn.Sequential(nn.Conv2d(4, 4, 1), nn.Conv2d(4, 8, 3, groups=2))
    modules, before = list(model.modules()), full_state(model)
    with pytest.raises(ValueError, match=r"'1' is a grouped convolution \(Conv2d with groups=2\)"):
        get_peft_model(model, TuckerAdapterConfig(target_modules=["0", "1"]))
    assert list(model.modules()) == modules   # module 0 was adapted first: it is back
    assert_same_state(before, full_state(model))
