"""Why do ranks stop moving? One runner run with every integrator step's truncation recorded per adapter.

    PYTHONPATH=. OMP_NUM_THREADS=1 python -m benchmarks.glue.rank_probe --preset demo --method tdlrt \
        --output_dir outputs/rank-probe [any runner flag]

Writes ``probe.json`` (per step, per adapter of the matrix groups: old rank, augmented rank, new rank, ``||C||``,
``||Ĉ||``, the energy of the new directions' blocks of ``Ĉ``, the singular values of ``Ĉ``, the threshold
``τ ||Ĉ||``, the learning rate) and ``probe.png`` (medians over adapters against the step) next to the runner's
own JSON and rank plot.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from tdrlt_peft.math import engine

from .args import parse_args
from .report import write_report
from .run import run_all

RECORDS: list[dict] = []


def _probe(propose):
    def wrapped(group, core_grad, k_grads, lr, bounds, adam=None):
        proposal = propose(group, core_grad, k_grads, lr, bounds, adam)
        if not group.matrix:
            return proposal
        r = group.ranks[:, 0]
        core_hat = proposal.core                                              # (B, R1, R2)
        old = engine.block_mask(group.ranks, list(core_hat.shape[1:]))
        energy = core_hat.square().sum((1, 2))
        old_energy = (core_hat * old).square().sum((1, 2))
        values = proposal.eig[0][0].clamp_min(0)                             # σ^2 of Ĉ, descending
        lr_value = float(lr)
        for b in range(core_hat.shape[0]):
            RECORDS.append({
                "group": f"{tuple(group.factors[0].shape[1:2])}x{tuple(group.factors[1].shape[1:2])}",
                "index": b, "lr": lr_value, "tau": float(bounds.tau[b]),
                "rank_old": int(r[b]), "augmented": [int(a) for a in proposal.augmented[b]],
                "rank_new": int(proposal.ranks[b, 0]),
                "core_norm": float(group.core[b].norm()), "core_hat_norm": float(energy[b].sqrt()),
                "new_block_norm": float((energy[b] - old_energy[b]).clamp_min(0).sqrt()),
                "old_block_step": float(((core_hat[b] - group.core[b]) * old[b]).norm()),
                "sigma": values[b, :int(proposal.augmented[b].min())].sqrt().tolist(),
            })
        return proposal
    return wrapped


def steps_of(records: list[dict]) -> list[list[dict]]:
    """Records grouped into integrator steps (a step is one record per adapter; adapters repeat per step)."""
    n = len({(r["group"], r["index"]) for r in records})
    return [records[i:i + n] for i in range(0, len(records), n)]


def candidate(r: dict) -> float:
    """σ_{r+1} of Ĉ: the largest singular value past the rank before the step (0 if none)."""
    return r["sigma"][r["rank_old"]] if len(r["sigma"]) > r["rank_old"] else 0.0


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    steps = steps_of(records)
    t = np.arange(1, len(steps) + 1)

    def med(key, fn=None):
        return np.array([np.median([fn(r) if fn else r[key] for r in s]) for s in steps])

    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    a.semilogy(t, med("core_norm"), label="||C|| (before the step)")
    a.semilogy(t, med(None, lambda r: r["tau"] * r["core_hat_norm"]), label="threshold τ||Ĉ||")
    a.semilogy(t, med("new_block_norm"), label="||new directions' blocks of Ĉ||")
    a.semilogy(t, med(None, lambda r: r["sigma"][r["rank_new"] - 1] if r["sigma"] else 0), label="σ_k kept (last)")
    a.semilogy(t, med(None, candidate), label="σ_{r+1}: largest direction past the old rank r")
    a.semilogy(t, med(None, lambda r: r["new_block_norm"] ** 2 / r["sigma"][r["rank_old"] - 1]
                      if r["sigma"] and r["sigma"][r["rank_old"] - 1] > 0 else 0), ":",
               label="||new blocks||² / σ_r (second-order scale)")
    a.semilogy(t, med("lr"), "--", label="learning rate")
    a.set_ylabel("median over adapters")
    a.legend(fontsize=7)
    b.plot(t, med("rank_new"), label="median rank")
    b.plot(t, [sum(r["rank_new"] != r["rank_old"] for r in s) for s in steps], label="# adapters whose rank changed")
    b.set_xlabel("integrator step")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    torch.set_num_threads(1)
    args = parse_args(argv if argv is not None else sys.argv[1:])
    engine.propose = _probe(engine.propose)
    run_all(args)
    write_report(args.run.output_dir)
    out = Path(args.run.output_dir)
    (out / "probe.json").write_text(json.dumps(RECORDS))
    plot(RECORDS, out / "probe.png")
    print(f"{len(steps_of(RECORDS))} steps probed; {out / 'probe.json'}, {out / 'probe.png'}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--replot":          # --replot OUTPUT_DIR: probe.png from probe.json
        plot(json.loads(Path(sys.argv[2], "probe.json").read_text()), Path(sys.argv[2], "probe.png"))
        sys.exit(0)
    sys.exit(main())
