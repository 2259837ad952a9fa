"""Settings of the claims benchmark and the function a worker process runs (importable, for ``spawn``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

EXPERIMENTS = ("stability", "saturation", "approximation", "descent", "network")


@dataclass
class Settings:
    quick: bool = False
    workers: int = 2
    stability_steps: int = 1000
    stability_lrs: list[float] = field(default_factory=lambda: [1e-3, 1e-2, 0.1, 0.5, 1.0, 1.9, 3.0])
    saturation_lrs: list[float] = field(default_factory=lambda: [0.1, 1.0])
    approx_lrs: list[float] = field(default_factory=lambda: [0.4, 0.2, 0.1, 0.05, 0.025])
    approx_taus: list[float] = field(default_factory=lambda: [0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2])
    approx_noises: list[float] = field(default_factory=lambda: [0.0, 1e-3, 1e-2, 1e-1])
    approx_horizon: float = 5.0
    descent_steps: int = 300
    descent_lrs: list[float] = field(default_factory=lambda: [0.01, 0.1, 0.5, 1.0, 1.9])
    descent_taus: list[float] = field(default_factory=lambda: [0.0, 1e-4, 1e-2, 1e-1])
    network_steps: int = 300
    network_lrs: list[float] = field(default_factory=lambda: [1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0, 10.0])

    @classmethod
    def quick_settings(cls, workers: int) -> Settings:
        return cls(quick=True, workers=workers, stability_steps=150, stability_lrs=[0.01, 0.1, 1.0, 3.0],
                   saturation_lrs=[1.0], approx_lrs=[0.4, 0.1], approx_taus=[0.0, 1e-3], approx_noises=[0.0, 1e-2],
                   approx_horizon=2.0, descent_steps=60, descent_lrs=[0.1, 1.0], descent_taus=[0.0, 1e-2],
                   network_steps=40, network_lrs=[0.01, 1.0, 3.0])


def experiment_module(name: str):
    from . import approximation, descent, network, saturation, stability

    return {"stability": stability, "saturation": saturation, "approximation": approximation, "descent": descent,
            "network": network}[name]


def run_task(task: dict) -> dict:
    """One run, with its CPU time (the wall time depends on what else the machine runs)."""
    start = time.process_time()
    result = experiment_module(task["experiment"]).run(task)
    return {**result, "cpu_seconds": time.process_time() - start}


def init_worker() -> None:
    """One thread per worker process: the runs are small and the workers share the cores."""
    import torch

    torch.set_num_threads(1)


def cost(task: dict) -> float:
    """Rough relative cost, to start the long runs first."""
    steps = task.get("steps") or task.get("horizon", 1.0) / task.get("lr", 1.0)
    weight = 3.0 if "BUG" in str(task.get("method")) or task.get("integrator") == "bug" else 1.0
    return steps * weight
