"""Schedule the runs on a small process pool; a fixed-rank GD run starts as soon as its TDLRT run is done.

Each run writes one JSON into ``<output_dir>/runs``; an existing JSON is reused (a re-run resumes).
"""

from __future__ import annotations

import json
import re
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import find_data_dir, load_split
from .methods import Method
from .train import RunSpec, train_run

_DATA: dict = {}


def run_file(output_dir: Path, spec: RunSpec) -> Path:
    slug = re.sub(r"[^a-z0-9.=]+", "-", spec.method.label.lower()).strip("-")
    return output_dir / "runs" / f"{spec.network}_{slug}_seed{spec.seed}.json"


def _init_worker(data_dir: str | None, train_size: int, test_size: int, validation_size: int, threads: int) -> None:
    torch.set_num_threads(threads)
    folder = find_data_dir(data_dir)
    _DATA["train"] = load_split(folder, "train", train_size, seed=0)
    # training images the training subset does not hold (the same permutation, after it)
    _DATA["validation"] = load_split(folder, "train", validation_size, seed=0, offset=train_size) \
        if validation_size else None
    _DATA["test"] = load_split(folder, "test", test_size, seed=0)


def _work(spec: RunSpec, show_progress: bool) -> dict:
    return train_run(spec, _DATA["train"], _DATA["test"], progress=show_progress, validation=_DATA["validation"])


def _cached(path: Path, spec: RunSpec, train_size: int, test_size: int, validation_size: int) -> dict | None:
    """The stored result of this run, if it was made with the same settings."""
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    keys = ("epochs", "train_size", "test_size", "settings", "batch_size", "class_shift", "validation_size")
    wanted = (spec.epochs, train_size, test_size, asdict(spec.settings), spec.batch_size, spec.class_shift,
              validation_size or None)
    return result if tuple(result.get(k, 0.0 if k == "class_shift" else None) for k in keys) == wanted else None


def run_all(specs: list[RunSpec], output_dir: Path, *, data_dir: str | None, train_size: int, test_size: int,
            workers: int, threads: int, validation_size: int = 0) -> list[dict]:
    """Run every spec (``tucker-gd`` specs get the ranks of the free-rank TDLRT run with the same network, tau,
    seed)."""
    (output_dir / "runs").mkdir(parents=True, exist_ok=True)
    find_data_dir(data_dir)   # fail early, in the main process, with the install hint
    results: list[dict] = []
    waiting = [s for s in specs if s.method.kind == "tucker-gd"]
    ready = [s for s in specs if s.method.kind != "tucker-gd"]
    bar = tqdm(total=len(specs), desc="runs", dynamic_ncols=True)
    with ProcessPoolExecutor(workers, initializer=_init_worker,
                             initargs=(data_dir, train_size, test_size, validation_size, threads)) as pool:
        running: dict[Future, RunSpec] = {}

        def submit(spec: RunSpec) -> None:
            cached = _cached(run_file(output_dir, spec), spec, train_size, test_size, validation_size)
            if cached is not None:
                finish(spec, cached, cached=True)
            else:
                running[pool.submit(_work, spec, workers == 1)] = spec

        def finish(spec: RunSpec, result: dict, cached: bool = False) -> None:
            if not cached:
                run_file(output_dir, spec).write_text(json.dumps(result, indent=1))
            results.append(result)
            bar.update()
            bar.set_postfix_str(f"last: {spec.network} {spec.method.label} acc {result['accuracy']:.4f} "
                                f"cr {result['compression']:.3f}")
            if spec.method.kind == "tdlrt" and spec.method.freeze is None and spec.method.budget is None:
                for gd in [s for s in waiting if (s.network, s.seed, s.method.tau) ==
                           (spec.network, spec.seed, spec.method.tau)]:
                    waiting.remove(gd)
                    submit(replace(gd, ranks=result["ranks"]))

        for spec in ready:
            submit(spec)
        while running:
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in done:
                finish(running.pop(future), future.result())
    bar.close()
    if waiting:
        missing = ", ".join(f"{s.network} tau={s.method.tau} seed {s.seed}" for s in waiting)
        raise RuntimeError(f"tucker-gd runs without a TDLRT run to take the ranks from: {missing}")
    return results


def make_specs(networks: list[str], methods: list[str], taus: list[float], seeds: list[int], epochs: int,
               batch_size: int, settings, freezes: list[float] = (), class_shift: float = 0.0,
               budgets: list[int] = ()) -> list[RunSpec]:
    """Every (network, seed, method, tau); ``freezes``: TDLRT runs with ranks frozen at these fractions too;
    ``budgets``: TDLRT runs in budget mode too."""
    specs = []
    for network in networks:
        for seed in seeds:
            for kind in methods:
                variants = [Method(kind)] if kind == "dense" else [Method(kind, tau) for tau in taus]
                if kind == "tdlrt":
                    variants = [Method(kind, m.tau, f) for m in variants for f in [None, *freezes]]
                    variants += [Method(kind, budget=b) for b in budgets]
                specs += [RunSpec(m, network, seed, epochs, batch_size, settings, class_shift=class_shift)
                          for m in variants]
    return specs
