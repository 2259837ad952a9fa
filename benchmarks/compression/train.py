"""One training run: build the method's model, train with a cosine learning rate, evaluate, measure."""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from tdrlt_peft import count_active_parameters
from tdrlt_peft.math.geometry import truncates

from ..rank_history import RankRecorder
from .methods import LowRankSettings, Method, build, conv_parameter_count, conv_ranks
from .models import NETWORKS, conv_parameters


@dataclass(frozen=True)
class RunSpec:
    method: Method
    network: str
    seed: int
    epochs: int
    batch_size: int
    settings: LowRankSettings
    ranks: dict | None = None   # tucker-gd: the TDLRT run's final ranks
    class_shift: float = 0.0    # the first fraction of the steps sees only the classes < SHIFT_CLASSES


SHIFT_CLASSES = 5   # Fashion-MNIST labels 0-4: t-shirt, trouser, pullover, dress, coat


def batches(labels: torch.Tensor, batch_size: int, epochs: int, generator: torch.Generator,
            class_shift: float = 0.0):
    """The run's ``epochs * ceil(n / batch_size)`` batches of indices: shuffled epochs of the whole set, except
    that the first ``ceil(class_shift * total)`` batches come from shuffled epochs of the classes
    < ``SHIFT_CLASSES`` only (a data shift in the middle of training; 0: the plain epochs)."""
    total = epochs * math.ceil(len(labels) / batch_size)
    first = math.ceil(class_shift * total)

    def shuffled_epochs(index: torch.Tensor):
        while True:
            yield from index[torch.randperm(len(index), generator=generator)].split(batch_size)

    subset = (labels < SHIFT_CLASSES).nonzero().squeeze(1)
    yield from itertools.islice(shuffled_epochs(subset), first)
    yield from itertools.islice(shuffled_epochs(torch.arange(len(labels))), total - first)


def train_run(spec: RunSpec, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
              progress: bool = True, validation: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    built = build(spec.method, spec.network, spec.seed, spec.settings, spec.ranks)
    model, optimizer, integrator = built.model, built.optimizer, built.integrator
    x, y = train
    generator = torch.Generator().manual_seed(spec.seed)
    steps_per_epoch = math.ceil(len(y) / spec.batch_size)
    total = spec.epochs * steps_per_epoch
    lr = spec.settings.lr
    interval = spec.settings.truncation_interval
    if integrator is not None:
        integrator.set_run_length(total, spec.method.freeze)
    bar = tqdm(total=total, desc=f"{spec.network} {spec.method.label} seed {spec.seed}", leave=False,
               disable=not progress, dynamic_ncols=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    step, loss = 0, float("nan")
    recorder = RankRecorder(conv_ranks(model), count_active_parameters(model), every=max(1, total // 50)) \
        if integrator is not None else None
    model.train()
    for batch in batches(y, spec.batch_size, spec.epochs, generator, spec.class_shift):
        current = 0.5 * lr * (1 + math.cos(math.pi * step / total))   # cosine schedule, no warm-up
        for group in optimizer.param_groups:
            group["lr"] = current
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        loss.backward()
        if integrator is not None:
            integrator.step(current)   # TDLRT step of the factorized convolutions (clears their grads)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        # ranks as the tau rule decides them: the steps between truncations (interval > 1) are not recorded
        if recorder is not None and truncates(step - 1, interval, total):
            recorder.observe(step, conv_ranks(model), count_active_parameters(model), record=step == total)
        bar.update()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    train_time, cpu_time = time.perf_counter() - start, time.process_time() - cpu_start
    bar.close()
    accuracy = evaluate(model, *test)
    scores = {} if validation is None else {"validation_accuracy": evaluate(model, *validation),
                                            "validation_size": len(validation[1])}
    full = conv_parameters(NETWORKS[spec.network]())
    stored = conv_parameter_count(model)
    return {"network": spec.network, "method": spec.method.kind, "tau": spec.method.tau,
            "label": spec.method.label, "freeze": spec.method.freeze, "target_params": spec.method.budget,
            "class_shift": spec.class_shift,
            "seed": spec.seed, "accuracy": accuracy, **scores, "final_loss": loss.item(),
            "conv_params": stored, "conv_params_full": full, "compression": 1 - stored / full,
            "trainable_params": count_active_parameters(model), "ranks": conv_ranks(model),
            "wall_time_s": train_time, "cpu_time_s": cpu_time, "settings": asdict(spec.settings), "epochs": spec.epochs,
            "train_size": len(y), "test_size": len(test[1]), "batch_size": spec.batch_size,
            **(recorder.summary(total) if recorder is not None else {})}


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    correct = sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    return correct / len(y)
