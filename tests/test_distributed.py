"""Multi-process data parallel (DDP over gloo, 2 CPU processes) through ``torchrun`` and ``accelerate launch``.

The launched script (``scripts/ddp_train.py``) checks inside the run that every process applies process 0's rank
decision (process 1 is made to propose other ranks) and that the adapter tensors are bitwise identical on every
process. Here the 2-process result is compared with a 1-process run of the same global batch.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from tdrlt_peft import adapter_ranks
from tdrlt_peft.layers.inventory import iter_storages
from tdrlt_peft.training.checkpoint import last_complete_checkpoint, verify_checkpoint

from .scripts.tiny_trainer import adapter_state, build_trainer, subprocess_env, tiny_model
from .tolerances import DATA_PARALLEL

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"
GLOBAL_BATCH, STEPS = 16, 12

pytestmark = pytest.mark.integration


class RankHistory(TrainerCallback):
    def __init__(self):
        self.history: list[list[int]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.history.append([r for rs in adapter_ranks(model).values() for r in rs])


def one_process_run(out_dir, dtype, target_params: int | None = None) -> dict:
    history = RankHistory()
    trainer = build_trainer(out_dir, per_device_batch=GLOBAL_BATCH, max_steps=STEPS, callbacks=[history],
                            model=tiny_model(dtype=dtype, target_params=target_params))
    trainer.train()
    return {"state": adapter_state(trainer.model), "rank_history": history.history,
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}


def launch(launcher: list[str], out_dir: Path, dtype: torch.dtype, target_params: int | None = None) -> dict:
    command = [*launcher, str(SCRIPT), str(out_dir), "--global-batch", str(GLOBAL_BATCH), "--steps", str(STEPS),
               "--dtype", str(dtype).removeprefix("torch.")]
    if target_params is not None:
        command += ["--target-params", str(target_params)]
    run = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, f"{' '.join(command)} failed:\n{run.stdout[-2000:]}\n{run.stderr[-6000:]}"
    return torch.load(out_dir / "result.pt")


def represented(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ΔW = U S V^T per adapter (factors are only defined up to the step's SVD conventions) and the head."""
    out = {}
    for key, value in state.items():
        if key.endswith(".tdlrt_S.default"):
            module = key.removesuffix(".tdlrt_S.default")
            out[module] = state[f"{module}.tdlrt_U.default"] @ value @ state[f"{module}.tdlrt_V.default"].T
        elif "modules_to_save" in key:
            out[key] = value
    return out


def assert_matches_one_process(result: dict, reference: dict, dtype: torch.dtype) -> None:
    assert result["world_size"] == 2 and result["backend"] == "gloo"
    assert result["replica_spread"] == 0.0
    assert result["rank_history"] == reference["rank_history"]
    assert any(r != 2 for r in result["rank_history"][-1])    # the ranks moved
    got, expected = represented(result["state"]), represented(reference["state"])
    assert got.keys() == expected.keys() and len(got) == 14   # 12 adapters + head weight and bias
    tolerance = DATA_PARALLEL[dtype]
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=tolerance, rtol=0, msg=key)
    # the Trainer accumulates the logged loss in a float32 tensor (``Trainer._tr_loss``) whatever the model's dtype,
    # and 2 processes average two float32-rounded halves: logged losses agree to float32 round-off only
    losses, expected_losses = torch.tensor(result["losses"]), torch.tensor(reference["losses"])
    loss_tolerance = max(tolerance, 4 * torch.finfo(torch.float32).eps * expected_losses.abs().max().item())
    torch.testing.assert_close(losses, expected_losses, atol=loss_tolerance, rtol=0)


@pytest.fixture(scope="module")
def reference_float32(tmp_path_factory):
    return one_process_run(tmp_path_factory.mktemp("one_process"), torch.float32)


def test_torchrun_two_processes_match_one_process(tmp_path, reference_float32):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    assert_matches_one_process(launch(launcher, tmp_path, torch.float32), reference_float32, torch.float32)
    # checkpoints marked complete after every process wrote its files
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / f"checkpoint-{STEPS}")
    for step in (STEPS // 2, STEPS):
        files = verify_checkpoint(tmp_path / f"checkpoint-{step}")["files"]
        assert {"rng_state_0.pth", "rng_state_1.pth", "adapter_model.safetensors", "trainer_state.json"} <= set(files)


def test_torchrun_budget_mode_takes_one_decision(tmp_path):
    """Budget mode under DDP: process 1's budget decision is made to differ; the broadcast one is applied."""
    target = 3000
    reference = one_process_run(tmp_path / "one", torch.float32, target)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = launch(launcher, tmp_path / "two", torch.float32, target)
    assert_matches_one_process(result, reference, torch.float32)
    sizes = [sum(U.shape[0] for U in s.factors) for s in iter_storages(tiny_model(target_params=target))]
    for ranks in result["rank_history"]:                     # matrix adapters: (r, r) each, (out + in) r + r^2
        assert sum(n * r + r * r for n, r in zip(sizes, ranks[::2])) <= target


def test_gradient_accumulation_matches_one_large_batch(tmp_path, reference_float32):
    """The same global batch as 8 x 2 accumulation steps (in-process): the global-batch semantics the DDP test
    relies on, and the loss-scaling pitfall of the docs (``accepts_loss_kwargs``)."""
    history = RankHistory()
    trainer = build_trainer(tmp_path, per_device_batch=GLOBAL_BATCH // 2, gradient_accumulation_steps=2,
                            max_steps=STEPS, callbacks=[history])
    trainer.train()
    result = {"world_size": 2, "backend": "gloo", "replica_spread": 0.0, "rank_history": history.history,
              "state": adapter_state(trainer.model),
              "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}
    assert_matches_one_process(result, reference_float32, torch.float32)


@pytest.mark.slow
def test_accelerate_launch_two_processes_match_one_process(tmp_path, reference_float32):
    # `accelerate launch` through the interpreter: accelerate is a dependency, its console script may not be on PATH
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    assert_matches_one_process(launch(launcher, tmp_path, torch.float32), reference_float32, torch.float32)


@pytest.mark.slow
def test_torchrun_float64_matches_one_process_to_round_off(tmp_path):
    reference = one_process_run(tmp_path / "one", torch.float64)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    assert_matches_one_process(launch(launcher, tmp_path / "two", torch.float64), reference, torch.float64)
