"""Command-line arguments: dataclasses parsed by ``HfArgumentParser`` (a ``.json`` file of them works too).

Recipe fields (learning rate, epochs, ranks, tau, ...) are generated from ``recipes.Recipe``: each defaults to
None, meaning "the task's published recipe". A preset (``--preset demo``, the default with no arguments
at all) supplies defaults that the rest of the command line still overrides.
"""

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from . import RunnerError
from .data import OFFLINE_DATASETS, glue_files, task_to_keys
from .recipes import PRESETS, Recipe

METHODS = ("tdlrt", "lora", "adalora", "full")


@dataclass
class ModelArguments:
    model: str = field(default="microsoft/deberta-v3-base", metadata={
        "aliases": ["--model_name_or_path"], "help": "Hub id or local folder of the pretrained encoder."})
    method: list[str] = field(default_factory=lambda: ["tdlrt"], metadata={
        "help": f"One or more of {', '.join(METHODS)}, or all."})
    target_modules: list[str] | None = field(default=None, metadata={
        "help": "Module names to adapt (PEFT matching). Default: every linear layer of attention and "
                "feed-forward in the encoder layers."})


@dataclass
class DataArguments:
    task: list[str] = field(default_factory=lambda: ["sst2"], metadata={
        "help": f"One or more of {', '.join(task_to_keys)}, or all."})
    dataset: str = field(default="glue", metadata={
        "help": "glue (the hub, or --data_dir), or offline: "
                + "; ".join(f"{name} ({d.help})" for name, d in OFFLINE_DATASETS.items()) + "."})
    data_dir: str | None = field(default=None, metadata={
        "help": "Folder with the GLUE files (train.tsv, dev.tsv; MNLI dev_matched.tsv, dev_mismatched.tsv), "
                "either one task's folder or the GLUE root holding CoLA/, SST-2/, ..."})
    max_train_samples: int | None = field(default=None, metadata={
        "help": "Train on a fixed random subset of this many examples."})
    max_eval_samples: int | None = field(default=None, metadata={
        "help": "Evaluate on a fixed random subset of this many examples (per dev set)."})


@dataclass
class RunArguments:
    preset: str | None = field(default=None, metadata={
        "help": f"Argument defaults for an offline run: {', '.join(PRESETS)} (no arguments at all: demo)."})
    seeds: list[int] = field(default_factory=lambda: [42], metadata={"help": "One run per seed."})
    output_dir: str = field(default="outputs/glue", metadata={
        "help": "Run JSONs, results.md and the plots go here; the report covers every run JSON in it."})
    logging_steps: int = field(default=50, metadata={"help": "Log (and record ranks) every N steps."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after N optimizer steps (smoke runs)."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Evaluation batch size."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches per optimizer step."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables)."})
    fp16: bool = field(default=False, metadata={"help": "fp16 mixed precision (CUDA)."})
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision."})
    use_cpu: bool = field(default=False, metadata={"help": "Train on the CPU even when a GPU is present."})


RecipeArguments = dataclasses.make_dataclass(
    "RecipeArguments",
    [(f.name, f.type | None, field(default=None, metadata=f.metadata)) for f in dataclasses.fields(Recipe)],
)
RecipeArguments.__doc__ = "Overrides of the per-task recipe (None: the published value)."

ARGUMENT_CLASSES = (ModelArguments, DataArguments, RunArguments, RecipeArguments)


@dataclass
class Args:
    model: ModelArguments
    data: DataArguments
    run: RunArguments
    recipe: object  # RecipeArguments

    def recipe_overrides(self) -> dict:
        return dataclasses.asdict(self.recipe)


def parse_args(argv: list[str] | None = None) -> Args:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(ARGUMENT_CLASSES, description="GLUE benchmark of TDLRT, LoRA, AdaLoRA and full "
                              "fine-tuning. No arguments: the offline demo (--preset demo).")
    if len(argv) == 1 and argv[0].endswith(".json"):
        with open(argv[0]) as f:
            given = json.load(f)
        defaults = _preset(given.get("preset"))
        parsed = parser.parse_dict({**defaults, **given})
    else:
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--preset", default="demo" if not argv else None)
        preset = pre.parse_known_args(argv)[0].preset
        parser.set_defaults(**{"preset": preset, **_preset(preset)})
        parsed = parser.parse_args_into_dataclasses(argv)
    return validate(Args(*parsed))


def _preset(name: str | None) -> dict:
    if name is None:
        return {}
    if name not in PRESETS:
        raise RunnerError(f"unknown --preset {name!r}; valid: {', '.join(PRESETS)}")
    return dict(PRESETS[name], preset=name)


def _expand(values: list[str], valid, flag: str) -> list[str]:
    values = [v.lower() for v in values]
    if values == ["all"]:
        return list(valid)
    bad = [v for v in values if v not in valid]
    if bad:
        raise RunnerError(f"unknown {flag} {', '.join(bad)}; valid: {', '.join(valid)} or all")
    return list(dict.fromkeys(values))


def validate(args: Args) -> Args:
    """Check names and combinations before anything slow happens; expand ``all``."""
    args.data.task = _expand(args.data.task, task_to_keys, "--task")
    args.model.method = _expand(args.model.method, METHODS, "--method")
    offline = OFFLINE_DATASETS.get(args.data.dataset)
    if offline is None and args.data.dataset != "glue":
        raise RunnerError(f"unknown --dataset {args.data.dataset!r}; valid: glue, {', '.join(OFFLINE_DATASETS)}")
    if offline is not None and args.data.task != [offline.task]:
        raise RunnerError(f"--dataset {args.data.dataset} uses the {offline.task} format and recipe: use it with "
                          f"--task {offline.task}")
    if not args.run.seeds:
        raise RunnerError("--seeds needs at least one seed")
    if args.data.data_dir is not None and args.data.dataset == "glue":
        for task in args.data.task:  # every missing file is reported before anything slow starts
            glue_files(task, args.data.data_dir)
    return args
