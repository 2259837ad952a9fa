"""Full training steps of LoRA and TDLRT, interleaved step by step in one process.

One step = forward, backward, ``integrator.step`` (TDLRT only: augment, core update, truncate) and the optimizer
step with ``zero_grad``. The methods alternate (A B, B A, ...) so that a slower stretch of the machine (other
processes, thermal state) hits both equally; medians over the timed steps after the warm-up.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tdrlt_peft import rank_statistics

from .counts import count_step
from .measure import clock, optimizer_tensors, profile_table, resident_bytes, step_peak_growth
from .models import DEBERTA_TARGETS, Method, conv_names, deberta, lora, tdlrt, vgg

PHASES = ("forward", "backward", "integrator", "optimizer", "total")


@dataclass
class Workload:
    """A model, its adapter targets and its batches."""

    name: str
    build: Callable[[], nn.Module]
    targets: Callable[[nn.Module], object]
    task_type: str | None
    make_batch: Callable[[torch.Generator], dict]
    loss: Callable[[nn.Module, dict], torch.Tensor]
    description: str


def deberta_workload(num_layers: int, batch_size: int, seq_len: int) -> Workload:
    def make_batch(g):
        ids = torch.randint(1, 128100, (batch_size, seq_len), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (batch_size,),
                                                                                                 generator=g)}
    return Workload("deberta", lambda: deberta(num_layers), lambda m: DEBERTA_TARGETS, "SEQ_CLS", make_batch,
                    lambda model, batch: model(**batch).loss,
                    f"DeBERTa-v3-base shape, {num_layers} layers, {6 * num_layers} adapters, batch {batch_size} x "
                    f"{seq_len}")


def minilm_workload(num_layers: int, batch_size: int, seq_len: int, pretrained: str | None = None) -> Workload:
    """all-MiniLM-L6-v2 shape (BERT, hidden 384): random weights, or the model in folder ``pretrained``."""
    from .minilm import MINILM_L6, MINILM_TARGETS, minilm

    def build():
        if pretrained is None:
            return minilm(num_layers)
        from transformers import AutoModelForSequenceClassification

        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(pretrained, num_labels=2)

    def make_batch(g):
        ids = torch.randint(1, MINILM_L6["vocab_size"], (batch_size, seq_len), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (batch_size,),
                                                                                                 generator=g)}
    weights = f"pretrained weights from {pretrained}" if pretrained else "random weights"
    return Workload("minilm", build, lambda m: MINILM_TARGETS, "SEQ_CLS", make_batch,
                    lambda model, batch: model(**batch).loss,
                    f"all-MiniLM-L6-v2 shape ({weights}), {num_layers} layers, {6 * num_layers} adapters, batch "
                    f"{batch_size} x {seq_len}")


def vgg_workload(batch_size: int) -> Workload:
    def make_batch(g):
        return {"images": torch.randn(batch_size, 3, 32, 32, generator=g),
                "labels": torch.randint(0, 10, (batch_size,), generator=g)}
    return Workload("vgg16", vgg, conv_names, None, make_batch, lambda model, batch: model(**batch),
                    f"VGG16 convs (13 Tucker/LoRA conv adapters), batch {batch_size} x 3 x 32 x 32")


def build_methods(workload: Workload, args, device: torch.device) -> list[Method]:
    methods = []
    for name in ("lora", "tdlrt"):
        model = workload.build().to(device)
        if name == "lora":
            methods.append(lora(model, workload.targets(model), args.r, args.lr, workload.task_type))
        else:
            methods.append(tdlrt(model, workload.targets(model), args.r, args.r_min, args.r_max, args.tau, args.lr,
                                 workload.task_type, integrator_kwargs=getattr(args, "integrator_kwargs", None)))
        methods[-1].model.train()
    return methods


def train_step(method: Method, workload: Workload, batch: dict, lr: float, device: torch.device
               ) -> dict[str, dict[str, float]]:
    """One timed training step: wall-clock and process CPU seconds per phase."""
    marks = [(clock(device), time.process_time())]
    loss = workload.loss(method.model, batch)
    marks.append((clock(device), time.process_time()))
    loss.backward()
    marks.append((clock(device), time.process_time()))
    if method.integrator is not None:
        method.integrator.step(lr)
    marks.append((clock(device), time.process_time()))
    method.optimizer.step()
    method.optimizer.zero_grad(set_to_none=True)
    marks.append((clock(device), time.process_time()))
    out: dict[str, dict[str, float]] = {"wall": {}, "cpu": {}}
    for kind, k in (("wall", 0), ("cpu", 1)):
        for phase, start, end in zip(PHASES, marks, marks[1:]):
            out[kind][phase] = end[k] - start[k]
        out[kind]["total"] = marks[-1][k] - marks[0][k]
    return out


def peak_memory(method: Method, workload: Workload, batch: dict, lr: float, device: torch.device) -> dict[str, int]:
    model = method.model
    resident = resident_bytes([*model.parameters(), *model.buffers(), *optimizer_tensors(method.optimizer)])
    growth = step_peak_growth(lambda: train_step(method, workload, batch, lr, device), device)
    return {"resident": resident, "step_growth": growth, "peak": resident + growth}


def integrator_counts(method: Method, workload: Workload, batch: dict, lr: float, device: torch.device) -> dict:
    """One extra training step with its integrator step counted (``counts.count_step``; per-op detail dropped)."""
    workload.loss(method.model, batch).backward()
    counts = count_step(method.integrator, lr, device)
    method.optimizer.step()
    method.optimizer.zero_grad(set_to_none=True)
    return {k: v for k, v in counts.items() if k != "ops"}


def compare(workload: Workload, args, device: torch.device) -> dict:
    """Interleaved timing of LoRA and TDLRT on ``workload``; medians, ratios, memory and the ranks seen."""
    methods = build_methods(workload, args, device)
    g = torch.Generator().manual_seed(0)
    batches = [{k: v.to(device) for k, v in workload.make_batch(g).items()} for _ in range(args.warmup + args.steps)]
    times: dict[str, list[dict[str, dict[str, float]]]] = {m.name: [] for m in methods}
    ranks: list[float] = []
    for i, batch in enumerate(batches):
        for method in methods if i % 2 == 0 else methods[::-1]:
            t = train_step(method, workload, batch, args.lr, device)
            if i >= args.warmup:
                times[method.name].append(t)
                if method.integrator is not None:
                    stats = rank_statistics(method.model)
                    ranks += [stats["tdlrt/min_rank"], stats["tdlrt/mean_rank"], stats["tdlrt/max_rank"]]
    result: dict = {"workload": workload.description, "steps": args.steps, "warmup": args.warmup}
    for m in methods:
        result[m.name] = {
            "median_s": {p: statistics.median(t["wall"][p] for t in times[m.name]) for p in PHASES},
            "median_cpu_s": {p: statistics.median(t["cpu"][p] for t in times[m.name]) for p in PHASES},
            "steps_s": [t["wall"]["total"] for t in times[m.name]],
            "steps_cpu_s": [t["cpu"]["total"] for t in times[m.name]],
            "memory_bytes": peak_memory(m, workload, batches[-1], args.lr, device),
        }
    if args.profile:
        for m in methods:
            table = profile_table(lambda m=m: train_step(m, workload, batches[-1], args.lr, device), device)
            path = args.output_dir / f"profile_{workload.name}_{m.name}_{device.type}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(table)
    if "cuda_graph" not in (getattr(args, "integrator_kwargs", None) or {}):     # a graph replay dispatches nothing
        result["tdlrt"]["integrator_counts"] = integrator_counts(methods[1], workload, batches[-1], args.lr, device)
    lora_r, tdlrt_r = result["lora"], result["tdlrt"]
    result["ratio"] = {
        "total": tdlrt_r["median_s"]["total"] / lora_r["median_s"]["total"],
        "total_paired_median": statistics.median(b / a for a, b in zip(lora_r["steps_s"], tdlrt_r["steps_s"])),
        "total_cpu": tdlrt_r["median_cpu_s"]["total"] / lora_r["median_cpu_s"]["total"],
        "forward_backward": ((tdlrt_r["median_s"]["forward"] + tdlrt_r["median_s"]["backward"])
                             / (lora_r["median_s"]["forward"] + lora_r["median_s"]["backward"])),
        "peak_memory": tdlrt_r["memory_bytes"]["peak"] / lora_r["memory_bytes"]["peak"],
        "step_memory_growth": tdlrt_r["memory_bytes"]["step_growth"] / max(lora_r["memory_bytes"]["step_growth"], 1),
    }
    result["integrator_share"] = tdlrt_r["median_s"]["integrator"] / tdlrt_r["median_s"]["total"]
    result["integrator_share_cpu"] = tdlrt_r["median_cpu_s"]["integrator"] / tdlrt_r["median_cpu_s"]["total"]
    result["tdlrt_ranks"] = {"min": min(ranks[0::3]), "mean": statistics.mean(ranks[1::3]), "max": max(ranks[2::3])}
    result["num_adapters"] = len(methods[1].integrator.storages())
    return result
