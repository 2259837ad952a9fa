"""One run = (task, method, seed): build, train with ``transformers.Trainer``, evaluate, write one JSON."""

import dataclasses
import gc
import json
import logging
import tempfile
import threading
import time
from pathlib import Path

import peft
import psutil
import torch
import transformers
from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments, set_seed

from ..rank_history import late_change_counts
from .args import Args
from .data import eval_splits, load_raw, subset, task_to_keys, tokenize
from .methods import build_model, load_backbone, load_tokenizer, trainable_parameters
from .metrics import glue_metrics, predictions_from_logits
from .recipes import Recipe, resolve_recipe
from .schedule import Schedule, plan_schedule

logger = logging.getLogger(__name__)


def run_all(args: Args) -> list[dict]:
    """Every (task, method, seed) of ``args``; returns the run records (also written as JSON files)."""
    out = Path(args.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(args.model.model)
    plan = [(m, s) for m in args.model.method for s in args.run.seeds]
    results, done = [], 0
    for task in args.data.task:
        recipe = resolve_recipe(task, args.recipe_overrides())
        data = prepare_data(task, args, tokenizer, recipe.max_seq_length)
        schedule = plan_schedule(len(data["train"]), recipe, args.run)  # a bad warm-up stops before training
        for method, seed in plan:
            done += 1
            print(f"\n[{done}/{len(plan) * len(args.data.task)}] task={task} method={method} seed={seed} "
                  f"train={len(data['train'])} examples", flush=True)
            result = run_one(task, method, seed, args, recipe, tokenizer, data, schedule)
            (out / f"{task}_{method}_seed{seed}.json").write_text(json.dumps(result, indent=1))
            print(f"    {result['metrics']}  trainable={result['trainable_params']:,}  "
                  f"{result['train_seconds']:.0f}s", flush=True)
            results.append(result)
    return results


def prepare_data(task: str, args: Args, tokenizer, max_length: int):
    raw = load_raw(task, args.data.dataset, args.data.data_dir)
    for name in raw:
        limit = args.data.max_train_samples if name == "train" else args.data.max_eval_samples
        raw[name] = subset(raw[name], limit)
    return tokenize(raw, tokenizer, task, max_length)


def run_one(task: str, method: str, seed: int, args: Args, recipe: Recipe, tokenizer, data,
            schedule: Schedule | None = None) -> dict:
    schedule = schedule or plan_schedule(len(data["train"]), recipe, args.run)
    set_seed(seed)
    model = load_backbone(args.model.model, task, recipe.cls_dropout)
    built = build_model(method, model, task, recipe, schedule.total_steps, args.model.target_modules)
    print(f"    {schedule.describe(built.learning_rate)}", flush=True)
    history = RankHistory(built) if built.ranks is not None else None
    on_gpu = torch.cuda.is_available() and not args.run.use_cpu
    with tempfile.TemporaryDirectory() as scratch:  # nothing is saved: save_strategy="no"
        trainer = Trainer(
            model=built.model, args=_training_arguments(scratch, seed, built.learning_rate, schedule, recipe, args),
            train_dataset=data["train"], data_collator=DataCollatorWithPadding(tokenizer),
            processing_class=tokenizer,
            callbacks=[*built.callbacks, *([history] if history else []), ScheduleCheck(schedule)])
        with PeakMemory(on_gpu) as peak:
            start = time.perf_counter()
            trainer.train()
            train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        metrics = evaluate(trainer, task, data, args.data.dataset)
        eval_seconds = time.perf_counter() - start
    spec = task_to_keys[task]
    result = {
        "task": task, "method": method, "seed": seed, "model": args.model.model,
        "dataset": args.data.dataset, "data_dir": args.data.data_dir,
        "metrics": metrics, "main_metric": spec.main_metric, "score": metrics[spec.main_metric],
        "trainable_params": int(built.active_params()),
        "stored_trainable_params": trainable_parameters(built.model),
        "total_params": sum(p.numel() for p in built.model.parameters()),
        "ranks": _ranks(built) if built.ranks else None,
        "rank_history": history.records if history else None,
        **(history.change_counts(trainer.state.global_step) if history else {}),
        "train_seconds": train_seconds, "eval_seconds": eval_seconds,
        "peak_memory_mb": peak.mb, "peak_memory_kind": peak.kind,
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "train_examples": len(data["train"]),
        "eval_examples": {s.hub_split: len(data[s.hub_split]) for s in eval_splits(task, args.data.dataset)},
        "optimizer_steps": trainer.state.global_step, "learning_rate": built.learning_rate,
        "schedule": schedule.record(built.learning_rate),
        "recipe": dataclasses.asdict(recipe), "adapter_config": _adapter_config(built.model),
        "log_history": trainer.state.log_history,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
    }
    del trainer, built, model
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    return result


def _ranks(built) -> dict:
    """Module -> ranks per mode, named as in the transformers model (without PEFT's ``base_model.model.``)."""
    return {k.removeprefix("base_model.model."): list(v) for k, v in built.ranks().items()}


def _adapter_config(model) -> dict | None:
    """The PEFT config as used (e.g. AdaLoRA's rescaled schedule); None for full fine-tuning."""
    config = getattr(model, "peft_config", {}).get("default")
    if config is None:
        return None
    return json.loads(json.dumps(config.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


def _training_arguments(output_dir: str, seed: int, learning_rate: float, schedule: Schedule, recipe: Recipe,
                        args: Args):
    return TrainingArguments(
        output_dir=output_dir, seed=seed, data_seed=seed, learning_rate=learning_rate,
        num_train_epochs=recipe.num_train_epochs, max_steps=args.run.max_steps,
        per_device_train_batch_size=recipe.per_device_train_batch_size,
        per_device_eval_batch_size=args.run.per_device_eval_batch_size,
        gradient_accumulation_steps=args.run.gradient_accumulation_steps, warmup_steps=schedule.warmup_steps,
        weight_decay=recipe.weight_decay, max_grad_norm=args.run.max_grad_norm, lr_scheduler_type=schedule.scheduler,
        logging_steps=args.run.logging_steps, eval_strategy="no", save_strategy="no", report_to="none",
        fp16=args.run.fp16, bf16=args.run.bf16, use_cpu=args.run.use_cpu, disable_tqdm=False,
        dataloader_pin_memory=torch.cuda.is_available() and not args.run.use_cpu,
    )


def evaluate(trainer: Trainer, task: str, data, dataset: str = "glue") -> dict:
    """Metrics of every scored split (``data.eval_splits``); names get the split's prefix (MNLI's ``matched_``)."""
    metrics = {}
    for split in eval_splits(task, dataset):
        out = trainer.predict(data[split.hub_split])
        scores = glue_metrics(task, predictions_from_logits(task, out.predictions), out.label_ids)
        metrics.update({f"{split.prefix}_{k}" if split.prefix else k: v for k, v in scores.items()})
    return metrics


class ScheduleCheck(TrainerCallback):
    """Warn when the Trainer counts other optimizer steps than the printed schedule (e.g. several devices)."""

    def __init__(self, schedule: Schedule):
        self.schedule = schedule

    def on_train_begin(self, args, state, control, **kwargs):
        if state.max_steps != self.schedule.total_steps:
            logger.warning("the Trainer runs %d optimizer steps, not the %d of the printed schedule (several "
                           "devices?): its warm-up of %d steps is %.0f%% of the run", state.max_steps,
                           self.schedule.total_steps, self.schedule.warmup_steps,
                           100 * self.schedule.warmup_steps / max(state.max_steps, 1))


class RankHistory(TrainerCallback):
    """Per-module ranks and active parameters at the start, at every logging step and at the end; and every rank
    change, step by step (``changes``: ``[step, module, old, new]``, compared after each optimizer step)."""

    def __init__(self, built):
        self.built, self.records, self.changes = built, [], []
        self._last: dict | None = None

    def _truncated(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based, as the Trainer counts) ended with the tau rule: with a
        ``truncation_interval`` the steps in between hold every augmented direction and are not recorded."""
        integrator = next((c.integrator for c in self.built.callbacks if getattr(c, "integrator", None)), None)
        if integrator is None or step == 0:
            return True
        from tdrlt_peft.math.geometry import truncates

        return truncates(step - 1, integrator.truncation_interval, integrator.total_steps)

    def _record(self, step: int):
        if not self._truncated(step):
            return
        if not self.records or self.records[-1]["step"] != step:
            ranks = _ranks(self.built)
            active = int(self.built.active_params())
            self.records.append({"step": step, "active_params": active, "ranks": ranks})

    def on_train_begin(self, args, state, control, **kwargs):
        self._record(0)
        self._last = _ranks(self.built)

    def on_step_end(self, args, state, control, **kwargs):
        if not self._truncated(state.global_step):
            return
        ranks = _ranks(self.built)
        self.changes += [[state.global_step, m, self._last.get(m), r] for m, r in ranks.items()
                         if self._last.get(m) != r]
        if ranks != self._last:                        # the plot shows every change (logging steps may miss them)
            self._record(state.global_step)
        self._last = ranks

    def change_counts(self, total_steps: int) -> dict:
        """``rank_changes_after_{10,25}pct`` and the changes themselves."""
        return {**late_change_counts(self.changes, total_steps), "rank_changes": self.changes}

    def on_log(self, args, state, control, **kwargs):
        self._record(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self._record(state.global_step)


class PeakMemory:
    """Peak memory of a block in MiB: CUDA max allocated, else the process RSS sampled every 50 ms."""

    def __init__(self, cuda: bool):
        self.cuda, self.kind, self.mb = cuda, "cuda_max_allocated" if cuda else "cpu_rss", 0.0
        self._stop = threading.Event()

    def _sample(self):
        process = psutil.Process()
        while not self._stop.wait(0.05):
            self.mb = max(self.mb, process.memory_info().rss / 2**20)

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self.mb = psutil.Process().memory_info().rss / 2**20
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            self._thread.join()
        return False
