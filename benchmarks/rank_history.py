"""Rank history of a run, shared by the benchmarks: every rank change step by step, the changes after the first
10 % / 25 % of the steps, and the rank-per-layer plot (each module's rank over training, active parameters)."""

from __future__ import annotations

import re
from pathlib import Path

LATE_FRACTIONS = (10, 25)  # percent of the run's optimizer steps


class RankRecorder:
    """Call :meth:`observe` after every optimizer step with the ranks (module -> ranks per mode) after it; keeps the
    changes ``[step, module, old, new]`` and a history entry every ``every`` steps, at every change and at the end."""

    def __init__(self, ranks: dict, active_params: int, every: int = 1):
        self.every, self.changes = every, []
        self.history = [{"step": 0, "active_params": int(active_params), "ranks": _plain(ranks)}]
        self._last = _plain(ranks)

    def observe(self, step: int, ranks: dict, active_params: int, record: bool = False) -> None:
        ranks = _plain(ranks)
        changed = [[step, m, self._last.get(m), r] for m, r in ranks.items() if self._last.get(m) != r]
        self.changes += changed
        self._last = ranks
        # a change is always recorded: a run observed only on some steps (truncation steps) keeps its plot exact
        if (record or changed or step % self.every == 0) and self.history[-1]["step"] != step:
            self.history.append({"step": step, "active_params": int(active_params), "ranks": ranks})

    def summary(self, total_steps: int) -> dict:
        """Run-record fields: ``rank_changes_after_{10,25}pct``, ``rank_changes`` and ``rank_history``."""
        return {**late_change_counts(self.changes, total_steps), "rank_changes": self.changes,
                "rank_history": self.history}


def late_change_counts(changes: list, total_steps: int) -> dict:
    """Rank changes (one per module and step whose rank moved) after the first 10 % / 25 % of the steps."""
    return {f"rank_changes_after_{p}pct": sum(c[0] > p / 100 * total_steps for c in changes) for p in LATE_FRACTIONS}


def _plain(ranks: dict) -> dict:
    return {k: list(v) for k, v in ranks.items()}


def short_name(module: str) -> str:
    """``...deberta.encoder.layer.3.attention.self.query_proj`` -> ``3.attention.self.query_proj``."""
    return re.sub(r"^.*?\.layers?\.", "", module)


def plot_rank_history(history: list[dict], title: str, path) -> Path:
    """Heat map of each module's rank (largest mode) against the optimizer step, active parameters below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    modules = list(history[-1]["ranks"])
    steps = [h["step"] for h in history]
    # (modules, records): the largest mode rank of each module (modes agree for matrix adapters)
    grid = np.array([[max(h["ranks"].get(m, [0])) for h in history] for m in modules], dtype=float)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 3 + 0.12 * len(modules)), sharex=True,
                                      gridspec_kw={"height_ratios": [4, 1]}, layout="constrained")
    # record k's ranks hold from its step to the next record's (records may be sparse: changes only); the last
    # record gets one step, so the axis ends with the run
    edges = np.array(steps + [steps[-1] + 1], float)
    mesh = top.pcolormesh(edges, np.arange(len(modules) + 1), grid, cmap="viridis", shading="flat")
    top.set_yticks(np.arange(len(modules)) + 0.5, [short_name(m) for m in modules], fontsize=5)
    top.invert_yaxis()
    top.set_title(title)
    fig.colorbar(mesh, ax=[top, bottom], label="rank")   # both axes keep one width: their steps line up
    if all(h.get("active_params") is not None for h in history):
        bottom.plot(steps, [h["active_params"] for h in history])
        bottom.set_ylabel("active params")
    else:                                              # a history rebuilt from rank changes: no sizes
        bottom.plot(steps, grid.mean(0))
        bottom.set_ylabel("mean rank")
    bottom.set_xlabel("optimizer step")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
