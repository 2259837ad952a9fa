"""One Dreambooth run per (method, size, seed), reading top to bottom: prepare the shared data once, then for
each run copy the base UNet, add the adapter, train with prior preservation, measure, sample, write a JSON.

Losses (``pipeline.denoising_loss``): ``subject_loss`` on the validation images with the instance prompt,
``prior_loss_before`` / ``prior_loss_after`` on the prior-evaluation images with the class prompt, by the base
model and by the trained one; every model sees the same timesteps and noise.
"""

from __future__ import annotations

import copy
import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import torch
from torch import Tensor

from ..rank_history import RankRecorder
from . import methods
from .base import BaseRecipe, offline_base
from .data import image_files, load_images, offline_subject, save_images
from .pipeline import Components, denoising_loss, encode_prompts, load_components, sample, to_latents, training_target

SAMPLE_SEED = 0


@dataclass
class Prepared:
    """What every run shares (built once per process)."""

    parts: Components
    targets: list[str]
    instance: Tensor          # (N_i, C, h, w) latents of the instance images
    classes: Tensor | None    # (N_c, C, h, w) latents of the class images (prior preservation)
    validation: Tensor        # subject_loss images
    prior_eval: Tensor        # prior_loss images
    instance_context: Tensor  # (1, L, D) encoded instance prompt
    class_context: Tensor
    empty_context: Tensor     # the empty prompt (classifier-free guidance)
    before: dict              # the base model's losses


def fill_offline_defaults(args) -> None:
    """Model and data folders the user did not give: the cached offline base model and subject."""
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else None
    if args.pretrained_model_name_or_path is None:
        recipe = BaseRecipe() if args.base_steps is None else BaseRecipe(steps=args.base_steps)
        args.pretrained_model_name_or_path = str(offline_base(cache, recipe))
    if args.instance_data_dir is None:
        from .base import default_cache_dir

        folders = offline_subject((cache or default_cache_dir()) / "fashion-mnist-subject")
        args.instance_data_dir = str(folders["instance"])
        args.validation_data_dir = args.validation_data_dir or str(folders["heldout"])
        args.prior_eval_data_dir = args.prior_eval_data_dir or str(folders["prior_heldout"])
    args.validation_data_dir = args.validation_data_dir or args.instance_data_dir
    args.class_data_dir = args.class_data_dir or str(Path(args.output_dir) / "class_images")


def prepare(args, generate: bool = False) -> Prepared:
    """Load the model and every image set; ``generate``: first make the missing class images."""
    parts = load_components(args.pretrained_model_name_or_path)
    targets = methods.resolve_targets(parts.unet, args.target_modules)
    resolution = args.resolution or parts.resolution
    contexts = encode_prompts(parts, [args.instance_prompt, args.class_prompt, ""])            # (3, L, D)
    instance_context, class_context, empty_context = contexts[0:1], contexts[1:2], contexts[2:3]
    if generate:
        make_class_images(args, parts, class_context, empty_context)

    def latents(folder: str, flag: str) -> Tensor:
        return to_latents(parts, load_images(folder, flag, resolution, parts.image_channels))

    classes = latents(args.class_data_dir, "--class_data_dir")[:args.num_class_images] \
        if args.with_prior_preservation else None
    prior_folder = args.prior_eval_data_dir or args.class_data_dir
    prep = Prepared(parts, targets, latents(args.instance_data_dir, "--instance_data_dir"), classes,
                    latents(args.validation_data_dir, "--validation_data_dir"),
                    latents(prior_folder, "--prior_eval_data_dir"), instance_context, class_context, empty_context,
                    {})
    prep.before = {"subject_loss": loss_on(prep, parts.unet, prep.validation, instance_context, args),
                   "prior_loss": loss_on(prep, parts.unet, prep.prior_eval, class_context, args)}
    return prep


def make_class_images(args, parts: Components, class_context: Tensor, empty_context: Tensor) -> None:
    """diffusers' rule: generate the class images that ``--class_data_dir`` lacks, with the base model."""
    folder = Path(args.class_data_dir)
    have = len(image_files(folder, "--class_data_dir")) if folder.is_dir() and any(folder.iterdir()) else 0
    needed = max(args.num_class_images if args.with_prior_preservation else 0,
                 0 if args.prior_eval_data_dir else args.num_class_images) - have
    if needed <= 0:
        return
    print(f"Generating {needed} class images for {args.class_prompt!r} in {folder}")
    images = sample(parts, parts.unet, class_context, empty_context, needed, seed=1000 + have,
                    steps=args.num_inference_steps, guidance_scale=args.guidance_scale)
    save_images(images, folder, stem=f"class_{have:04d}_")


def loss_on(prep: Prepared, unet, latents: Tensor, context: Tensor, args) -> float:
    return denoising_loss(unet, prep.parts.scheduler, latents, context, args.num_eval_timesteps)


def run_name(method: str, size: float, seed: int) -> str:
    return f"{method}_{methods.SIZE_NAME[method]}{size:g}_seed{seed}"


def one_run(prep: Prepared, method: str, size: float, seed: int, args, progress: bool = True) -> dict:
    """Train one adapter and measure it; writes ``runs/<name>.json`` (and samples for the first seed)."""
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    name = run_name(method, size, seed)
    out = Path(args.output_dir)
    torch.manual_seed(seed)                                      # the adapter's initialisation
    adapted = methods.build(method, size, copy.deepcopy(prep.parts.unet), prep.targets, args)
    model, optimizer, scheduler = adapted.model, adapted.optimizer, prep.parts.scheduler
    lr_schedule = get_scheduler("constant", optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    g = torch.Generator().manual_seed(seed)
    batch = args.train_batch_size
    model.train()
    recorder = RankRecorder(adapted.ranks(), adapted.count(), every=max(1, args.max_train_steps // 50)) \
        if method == "tdlrt" else None
    start = time.perf_counter()
    for step in tqdm(range(1, args.max_train_steps + 1), desc=name, disable=not progress, leave=False):
        x = prep.instance[torch.randint(0, len(prep.instance), (batch,), generator=g)]        # (B, C, h, w)
        context = prep.instance_context.expand(batch, -1, -1)
        if prep.classes is not None:   # instance and class examples in one batch
            x = torch.cat([x, prep.classes[torch.randint(0, len(prep.classes), (batch,), generator=g)]])
            context = torch.cat([context, prep.class_context.expand(batch, -1, -1)])
        noise = torch.randn(x.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x),), generator=g)
        pred = model(scheduler.add_noise(x, noise, t), t, context).sample
        error = (pred.float() - training_target(scheduler, x, noise, t)).pow(2)
        loss = error[:batch].mean()
        if prep.classes is not None:
            loss = loss + args.prior_loss_weight * error[batch:].mean()
        loss.backward()
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad()
        if recorder is not None:
            recorder.observe(step, adapted.ranks(), adapted.count(), record=step == args.max_train_steps)
    seconds = time.perf_counter() - start
    model.eval()
    record = {"method": method, "seed": seed, methods.SIZE_NAME[method]: size,
              "trainable_params": adapted.count(),
              "subject_loss": loss_on(prep, model, prep.validation, prep.instance_context, args),
              "subject_loss_before": prep.before["subject_loss"],
              "prior_loss_before": prep.before["prior_loss"],
              "prior_loss_after": loss_on(prep, model, prep.prior_eval, prep.class_context, args),
              "train_seconds": round(seconds, 2), "ranks": adapted.ranks(), "final_train_loss": float(loss.detach()),
              "settings": _settings(args, prep),
              **(recorder.summary(args.max_train_steps) if recorder is not None else {})}
    if args.save_adapters:
        model.save_pretrained(out / "adapters" / name)
    if seed == args.seeds[0]:
        merged = model.merge_and_unload()                        # sampling runs on the merged (dense) UNet
        images = sample(prep.parts, merged, prep.instance_context, prep.empty_context, args.num_samples,
                        SAMPLE_SEED, args.num_inference_steps, args.guidance_scale)
        save_images(images, out / "samples" / name, stem="sample_")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "runs" / f"{name}.json").write_text(json.dumps(record, indent=2))
    return record


def _settings(args, prep: Prepared) -> dict:
    keys = ("pretrained_model_name_or_path", "instance_prompt", "class_prompt", "with_prior_preservation",
            "prior_loss_weight", "max_train_steps", "learning_rate", "train_batch_size", "max_grad_norm",
            "instance_data_dir", "validation_data_dir", "prior_eval_data_dir", "num_eval_timesteps")
    settings = {k: getattr(args, k) for k in keys}
    settings.update(targets=prep.targets, tdlrt={"r": args.tdlrt_r, "r_max": args.tdlrt_r_max,
                                                 "scale": args.tdlrt_scale, "lr": args.tdlrt_learning_rate})
    return settings


def run_specs(args) -> list[tuple[str, float, int]]:
    return [(m, size, seed) for m in args.method for size in getattr(args, methods.SIZE_FLAG[m])
            for seed in args.seeds]


def run_all(args) -> list[dict]:
    """Prepare (class images included), write the base model's samples, then every run (in ``--workers``
    processes when there are several runs)."""
    from tqdm.auto import tqdm

    fill_offline_defaults(args)
    prep = prepare(args, generate=True)
    out = Path(args.output_dir)
    base_images = sample(prep.parts, prep.parts.unet, prep.instance_context, prep.empty_context, args.num_samples,
                         SAMPLE_SEED, args.num_inference_steps, args.guidance_scale)
    save_images(base_images, out / "samples" / "base", stem="sample_")
    specs = run_specs(args)
    bar = tqdm(total=len(specs), desc="runs")
    records = []
    if args.workers == 1 or len(specs) == 1:
        for spec in specs:
            records.append(one_run(prep, *spec, args))
            bar.update()
    else:
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"), initializer=_worker_init,
                                 initargs=(args,)) as pool:
            for record in pool.map(_worker_run, specs):
                records.append(record)
                bar.update()
    bar.close()
    return records


_WORKER: dict = {}


def _worker_init(args) -> None:
    torch.set_num_threads(args.threads)
    import tdrlt_peft  # noqa: F401  (registers the PEFT method in the fresh process)

    _WORKER["args"], _WORKER["prep"] = args, prepare(args)


def _worker_run(spec: tuple[str, float, int]) -> dict:
    return one_run(_WORKER["prep"], *spec, _WORKER["args"], progress=False)
