"""One Dreambooth run per (method, size, seed), reading top to bottom: prepare the shared data once, then for
each run copy the base UNet, add the adapter, train with prior preservation, measure, sample, write a JSON.

Losses (``pipeline.denoising_losses``): ``subject_loss`` on the validation images with the instance prompt,
``prior_loss_before`` / ``prior_loss_after`` on the prior-evaluation images with the class prompt, by the base
model and by the trained one; every model sees the same timesteps and noise.

Everything runs on ``--device`` (``device.Compute``): the model parts, the latents and the prompt encodings are
moved there once (``prepare``); random numbers are drawn on the CPU and moved, so CPU runs are unchanged.
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
from .device import Compute
from .pipeline import (
    Components,
    denoising_losses,
    encode_prompts,
    load_components,
    sample,
    to_latents,
    training_target,
)

SAMPLE_SEED = 0


@dataclass
class Prepared:
    """What every run shares (built once per process)."""

    parts: Components
    targets: list[str]
    instance: Tensor          # (N_i, C, h, w) latents of the instance images (all tensors on the device)
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
    parts = load_components(args.pretrained_model_name_or_path, Compute.from_args(args))
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


def losses_on(prep: Prepared, unet, latents: Tensor, context: Tensor, args) -> Tensor:
    """Per-image denoising losses (N,) float64 (``pipeline.denoising_losses``)."""
    return denoising_losses(prep.parts, unet, latents, context, args.num_eval_timesteps,
                            timesteps_per_image=args.eval_timesteps_per_image)


def loss_on(prep: Prepared, unet, latents: Tensor, context: Tensor, args) -> float:
    return float(losses_on(prep, unet, latents, context, args).mean())


def run_name(method: str, size: float, seed: int) -> str:
    return f"{method}_{methods.SIZE_NAME[method]}{size:g}_seed{seed}"


@dataclass
class TrainingBatch:
    """One step's examples: instance (then class) latents, their prompt encodings, noise and timesteps."""

    latents: Tensor    # (B or 2B, C, h, w)
    context: Tensor    # (B or 2B, L, D)
    noise: Tensor      # like latents
    timesteps: Tensor  # (B or 2B,)


def training_batch(prep: Prepared, batch: int, g: torch.Generator) -> TrainingBatch:
    """Draw one step's batch from ``g``: always on the CPU and in this order (instance indices, class indices,
    noise, timesteps), which is what keeps CPU runs identical whatever the device (``device`` module)."""
    compute = prep.parts.compute
    x = prep.instance[compute.randint(len(prep.instance), (batch,), g)]                      # (B, C, h, w)
    context = prep.instance_context.expand(batch, -1, -1)
    if prep.classes is not None:   # instance and class examples in one batch
        x = torch.cat([x, prep.classes[compute.randint(len(prep.classes), (batch,), g)]])
        context = torch.cat([context, prep.class_context.expand(batch, -1, -1)])
    noise = compute.randn(x.shape, g)
    t = compute.randint(prep.parts.scheduler.config.num_train_timesteps, (len(x),), g)
    return TrainingBatch(x, context, noise, t)


def training_loss(prep: Prepared, model, b: TrainingBatch, batch: int, prior_loss_weight: float) -> Tensor:
    """Denoising MSE of the instance half plus ``prior_loss_weight`` x that of the class half (when there is one);
    the UNet's forward under autocast, the loss in float32."""
    scheduler = prep.parts.scheduler
    noisy = scheduler.add_noise(b.latents, b.noise, b.timesteps)
    with prep.parts.compute.autocast():
        pred = model(noisy, b.timesteps, b.context).sample
    error = (pred.float() - training_target(scheduler, b.latents, b.noise, b.timesteps)).pow(2)
    loss = error[:batch].mean()
    if prep.classes is not None:
        loss = loss + prior_loss_weight * error[batch:].mean()
    return loss


def train(prep: Prepared, adapted: methods.Adapted, seed: int, args, desc: str, progress: bool,
          recorder: RankRecorder | None = None) -> Tensor:
    """``--max_train_steps`` optimizer steps (constant learning rate, clipping, fp16 loss scaling); returns the
    last loss. ``recorder``: follows the ranks step by step (TDLRT)."""
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    model, optimizer = adapted.model, adapted.optimizer
    lr_schedule = get_scheduler("constant", optimizer)
    scaler = prep.parts.compute.grad_scaler()     # a pass-through unless --mixed_precision fp16
    params = [p for group in optimizer.param_groups for p in group["params"]]
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in tqdm(range(1, args.max_train_steps + 1), desc=desc, disable=not progress, leave=False):
        b = training_batch(prep, args.train_batch_size, g)
        loss = training_loss(prep, model, b, args.train_batch_size, args.prior_loss_weight)
        scaler.scale(loss).backward()
        if args.max_grad_norm > 0:
            scaler.unscale_(optimizer)           # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        scaler.step(optimizer)                   # skips the step on non-finite fp16 gradients
        scaler.update()
        lr_schedule.step()
        optimizer.zero_grad()
        if recorder is not None:
            recorder.observe(step, adapted.ranks(), adapted.count(), record=step == args.max_train_steps)
    model.eval()
    return loss


def one_run(prep: Prepared, method: str, size: float, seed: int, args, progress: bool = True) -> dict:
    """Train one adapter and measure it; writes ``runs/<name>.json`` (and samples for the first seed)."""
    name = run_name(method, size, seed)
    out = Path(args.output_dir)
    torch.manual_seed(seed)                                      # the adapter's initialisation
    adapted = methods.build(method, size, base_unet_copy(prep, args), prep.targets, args)
    model = adapted.model
    recorder = RankRecorder(adapted.ranks(), adapted.count(), every=max(1, args.max_train_steps // 50)) \
        if method == "tdlrt" else None
    prep.parts.compute.synchronize()                             # the copy of the UNet is not training time
    start = time.perf_counter()
    loss = train(prep, adapted, seed, args, name, progress, recorder)
    prep.parts.compute.synchronize()
    seconds = time.perf_counter() - start
    record = {"method": method, "seed": seed, methods.SIZE_NAME[method]: size,
              "trainable_params": adapted.count(), "ranks": adapted.ranks()}
    if args.save_adapters:
        model.save_pretrained(out / "adapters" / name)
    merged = model.merge_and_unload()       # scored and sampled as shipped: the dense UNet (its forward is cheaper)
    subject = losses_on(prep, merged, prep.validation, prep.instance_context, args)          # (N,)
    record.update({"subject_loss": float(subject.mean()),
                   "subject_loss_per_image": [round(float(x), 8) for x in subject],
                   "subject_loss_before": prep.before["subject_loss"],
                   "prior_loss_before": prep.before["prior_loss"],
                   "prior_loss_after": loss_on(prep, merged, prep.prior_eval, prep.class_context, args),
                   "train_seconds": round(seconds, 2), "final_train_loss": float(loss.detach()),
                   "settings": _settings(args, prep),
                   **(recorder.summary(args.max_train_steps) if recorder is not None else {})})
    if seed == args.seeds[0]:
        images = sample(prep.parts, merged, prep.instance_context, prep.empty_context, args.num_samples,
                        SAMPLE_SEED, args.num_inference_steps, args.guidance_scale)
        save_images(images, out / "samples" / name, stem="sample_")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "runs" / f"{name}.json").write_text(json.dumps(record, indent=2))
    return record


def base_unet_copy(prep: Prepared, args) -> torch.nn.Module:
    """A fresh copy of the base UNet for one run (on the device), with ``--gradient_checkpointing`` if asked."""
    unet = copy.deepcopy(prep.parts.unet)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()     # diffusers' non-reentrant checkpoints: frozen inputs are fine
    return unet


def _settings(args, prep: Prepared) -> dict:
    keys = ("pretrained_model_name_or_path", "instance_prompt", "class_prompt", "with_prior_preservation",
            "prior_loss_weight", "max_train_steps", "learning_rate", "train_batch_size", "max_grad_norm",
            "instance_data_dir", "validation_data_dir", "prior_eval_data_dir", "num_eval_timesteps",
            "eval_timesteps_per_image", "device", "mixed_precision", "gradient_checkpointing")
    settings = {k: getattr(args, k) for k in keys}
    settings.update(targets=prep.targets, tdlrt={"r": args.tdlrt_r, "r_max": args.tdlrt_r_max,
                                                 "scale": args.tdlrt_scale, "lr": args.tdlrt_learning_rate,
                                                 "truncation_interval": args.tdlrt_truncation_interval})
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
