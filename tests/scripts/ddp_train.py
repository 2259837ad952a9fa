"""A TDLRT Trainer run under DDP, launched by ``torchrun`` or ``accelerate launch`` (CPU: gloo; GPUs: NCCL).

    torchrun --standalone --nproc_per_node 2 tests/scripts/ddp_train.py OUT_DIR
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no tests/scripts/ddp_train.py OUT_DIR

The global batch is fixed (``--global-batch``, split evenly over the processes), so the result can be compared
with a 1-process run. Checked on every process while it runs (an AssertionError fails the launch):

* process 1 deliberately *proposes* different ranks (one less, wherever allowed; with ``--target-params`` the
  budget's decision); the ranks applied must still be process 0's, identical on all processes after every step
  (``agree`` broadcasts them);
* after training the adapter tensors and the head are bitwise identical on every process.

Checkpoints are written half-way and at the end (with every process's RNG state and the completion marker).

Process 0 writes ``OUT_DIR/result.pt``: the trained tensors, the rank history and the measured replica spread.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # repo root, for `tests.scripts`

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from tdrlt_peft import adapter_ranks  # noqa: E402
from tdrlt_peft.layers.budget import BudgetRule  # noqa: E402
from tdrlt_peft.math import engine  # noqa: E402
from tests.scripts.tiny_trainer import adapter_state, build_trainer, tiny_model  # noqa: E402


class RankAgreement(TrainerCallback):
    """After every optimizer step: all processes hold the same ranks (gathered and compared)."""

    def __init__(self):
        self.history: list[list[int]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        ranks = torch.tensor([r for rs in adapter_ranks(model).values() for r in rs], dtype=torch.int64)
        gathered = [torch.empty_like(ranks) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, ranks)
        for other in gathered[1:]:
            assert torch.equal(other, gathered[0]), f"step {state.global_step}: ranks differ across processes"
        self.history.append(ranks.tolist())


def propose_one_less_on_process_1() -> None:
    """Make process 1's own rank decision differ from process 0's: only the broadcast can reconcile them."""
    original = engine.propose
    signature = inspect.signature(original)

    def propose(*args, **kwargs):
        proposal = original(*args, **kwargs)
        bounds = signature.bind(*args, **kwargs).arguments["bounds"]
        lowered = torch.maximum(bounds.r_min[:, None], proposal.ranks - 1)
        factored = torch.tensor([U is not None for U in proposal.bases], device=lowered.device)
        return dataclasses.replace(proposal, ranks=torch.where(factored, lowered, proposal.ranks))

    engine.propose = propose
    original_budget = BudgetRule.ranks

    def budget_ranks(self, groups, proposals):
        decided = original_budget(self, groups, proposals)
        return [torch.maximum(bounds.r_min[:, None], k - 1) for k, (_, bounds) in zip(decided, groups)]

    BudgetRule.ranks = budget_ranks


def replica_spread(model) -> float:
    """max |x_p - x_0| over every trained tensor and every process p."""
    flat = torch.cat([t.double().flatten() for _, t in sorted(adapter_state(model).items())])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return max(float((g - gathered[0]).abs().max()) for g in gathered)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--target-params", type=int, default=None)
    cli = parser.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))   # set by torchrun and accelerate launch
    assert world > 1 and cli.global_batch % world == 0, "launch several processes that split the global batch"
    agreement = RankAgreement()
    trainer = build_trainer(cli.out_dir, per_device_batch=cli.global_batch // world, max_steps=cli.steps,
                            seed=cli.seed, callbacks=[agreement], save_strategy="steps", save_steps=cli.steps // 2,
                            model=tiny_model(cli.seed, dtype=getattr(torch, cli.dtype),
                                             target_params=cli.target_params))
    assert dist.is_initialized() and dist.get_world_size() == world == trainer.args.world_size
    if dist.get_rank() == 1:
        propose_one_less_on_process_1()

    trainer.train()
    spread = replica_spread(trainer.model)
    assert spread == 0.0, f"adapter tensors differ across processes by {spread:.3e}"
    if dist.get_rank() == 0:
        torch.save({"state": adapter_state(trainer.model), "rank_history": agreement.history,
                    "world_size": world, "replica_spread": spread,
                    "backend": dist.get_backend(), "losses": [h["loss"] for h in trainer.state.log_history
                                                               if "loss" in h]},
                   Path(cli.out_dir) / "result.pt")


if __name__ == "__main__":
    try:
        main()
    finally:
        # Without this, gloo's worker threads may still hold tensors when the interpreter shuts down, and the
        # process aborts (SIGABRT, "terminate called without an active exception") after a successful run.
        if dist.is_initialized():
            dist.destroy_process_group()
