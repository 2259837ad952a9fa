"""The diffusion components the runner needs, from a diffusers folder or hub id, and the three things it does with
them: encode prompts and images, measure the denoising loss at fixed timesteps and noise, and sample (DDIM).

A folder holds ``unet/``, ``scheduler/``, ``tokenizer/``, ``text_encoder/`` (any ``AutoModel`` text encoder:
CLIP for Stable Diffusion, MiniLM for the offline base) and optionally ``vae/`` (then the UNet works on VAE
latents; without it, on pixels). The text encoder is frozen: prompts are encoded once.

Every part lives on ``Components.compute.device``; the UNet's forwards run under its autocast (``--mixed_precision``),
the text encoder and the VAE in float32 (each runs once per image or prompt, and the VAE overflows in fp16).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from . import RunnerError
from .device import CPU, Compute

MAX_PROMPT_TOKENS = 77
VAE_BATCH_SIZE = 8       # images per VAE encode/decode: at 512 x 512 a whole class folder at once runs out of memory


@dataclass
class Components:
    unet: torch.nn.Module
    scheduler: object             # the training (noise) scheduler, e.g. DDPMScheduler
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module | None
    source: str
    compute: Compute = CPU

    @property
    def image_channels(self) -> int:
        """Channels of the images the model sees: RGB through a VAE, else the UNet's input channels."""
        return 3 if self.vae is not None else self.unet.config.in_channels

    @property
    def resolution(self) -> int:
        """The model's native image size (a VAE downsamples by 2 per block)."""
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        return int(self.unet.config.sample_size) * factor


def load_components(name_or_path: str, compute: Compute = CPU) -> Components:
    """Load every component onto ``compute.device``, or raise a RunnerError that says what to do instead."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoModel, AutoTokenizer

    local = Path(name_or_path).expanduser()
    if local.exists() and not local.is_dir():
        raise RunnerError(f"--pretrained_model_name_or_path {name_or_path}: a file, not a diffusers folder.")
    if local.is_dir():
        missing = [sub for sub in ("unet", "scheduler", "tokenizer", "text_encoder") if not (local / sub).is_dir()]
        if missing:
            raise RunnerError(f"--pretrained_model_name_or_path {name_or_path}: not a diffusers folder, it lacks "
                              f"{', '.join(f'{m}/' for m in missing)} (expected unet/, scheduler/, tokenizer/, "
                              "text_encoder/ and optionally vae/).")
    source = str(local) if local.is_dir() else name_or_path
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
        scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
        tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer")
        text_encoder = AutoModel.from_pretrained(source, subfolder="text_encoder")
        vae = None
        if local.is_dir() and (local / "vae").is_dir() or not local.is_dir() and _hub_has_vae(source):
            vae = AutoencoderKL.from_pretrained(source, subfolder="vae")
    except (OSError, ValueError) as err:
        if local.is_dir():
            raise RunnerError(f"cannot load the diffusers folder {name_or_path}: {err}") from err
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = ("the hub is unreachable here (HF_HUB_OFFLINE is set): pass a local diffusers folder, or omit "
                "--pretrained_model_name_or_path to use the offline base model" if offline else
                "check the id and your connection, or pass a local diffusers folder")
        raise RunnerError(f"cannot load {name_or_path!r} from the Hugging Face hub: {hint}. ({err})") from err
    for module in (unet, text_encoder, vae):
        if module is not None:
            # float32 whatever the folder stores (an fp16 download): the adapters and the optimizer work in
            # float32 and --mixed_precision is autocast, never half-precision weights
            module.requires_grad_(False).eval().to(compute.device, torch.float32)
    return Components(unet, scheduler, tokenizer, text_encoder, vae, source, compute)


def _hub_has_vae(repo: str) -> bool:
    from huggingface_hub import file_exists

    try:
        return file_exists(repo, "vae/config.json")
    except Exception:  # offline or unreachable: the loads above already succeeded from the cache
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo, "vae/config.json"), str)


@torch.no_grad()
def encode_prompts(c: Components, prompts: list[str]) -> Tensor:
    """Text encoder's last hidden states ``(P, L, D)``, every prompt padded to the same length ``L``."""
    length = min(int(getattr(c.tokenizer, "model_max_length", MAX_PROMPT_TOKENS)), MAX_PROMPT_TOKENS)
    tokens = c.tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    inputs = {"input_ids": tokens.input_ids.to(c.compute.device)}
    if "attention_mask" in tokens and "clip" not in type(c.text_encoder).__name__.lower():
        inputs["attention_mask"] = tokens.attention_mask.to(c.compute.device)
    return c.text_encoder(**inputs).last_hidden_state.float()


@torch.no_grad()
def to_latents(c: Components, pixels: Tensor) -> Tensor:
    """Pixels ``(N, C, H, W)`` in [-1, 1] (any device) -> what the UNet denoises, on the device (VAE latents: the
    mean, times the scale)."""
    if c.vae is None:
        return pixels.to(c.compute.device)
    # batch by batch onto the device: only the latents of a whole folder are kept there (8x smaller per side)
    return _in_batches(lambda x: c.vae.encode(x.to(c.compute.device)).latent_dist.mode() * c.vae.config.scaling_factor,
                       pixels)


@torch.no_grad()
def to_pixels(c: Components, latents: Tensor) -> Tensor:
    if c.vae is None:
        return latents.clamp(-1, 1)
    return _in_batches(lambda z: c.vae.decode(z / c.vae.config.scaling_factor).sample.clamp(-1, 1), latents)


def _in_batches(fn, x: Tensor, batch_size: int = VAE_BATCH_SIZE) -> Tensor:
    return torch.cat([fn(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def training_target(scheduler, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """What the UNet predicts: the noise (epsilon), the velocity (v-prediction) or the clean sample."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise RunnerError(f"scheduler prediction_type {kind!r} is not supported (epsilon, v_prediction, sample).")


EVAL_PAIRS = 1000    # (image, timestep) pairs a default evaluation scores at least (all pairs if fewer)


def eval_noise_and_timesteps(compute: Compute, total_timesteps: int, shape: tuple[int, ...], num_timesteps: int,
                              seed: int) -> tuple[Tensor, Tensor]:
    """The fixed evaluation draw: noise ``(K, *shape)`` and ``K`` timesteps evenly spaced over the training range."""
    steps = torch.linspace(0.05 * total_timesteps, 0.95 * total_timesteps, num_timesteps).round().long()   # (K,)
    noise = compute.randn((num_timesteps, *shape), torch.Generator().manual_seed(seed))                   # (K, ...)
    return noise, steps.to(compute.device)


@torch.no_grad()
def denoising_losses(c: Components, unet, latents: Tensor, context: Tensor, num_timesteps: int, seed: int = 1234,
                     batch_size: int = 64, timesteps_per_image: int | None = None) -> Tensor:
    """Per-image mean squared error ``(N,)`` float64 of the UNet's prediction at fixed timesteps (``num_timesteps``
    evenly spaced over the training range) with fixed noise: the same numbers for every model evaluated on them.
    Per image, so a comparison of two models can say how much it depends on which images were scored.

    ``timesteps_per_image`` m: image n is scored at timesteps n, n+1, ..., n+m-1 (mod K) of the grid, with the
    same noise as in the full grid. With N a multiple of K every timestep is scored equally often, so the mean over
    images estimates the full grid's mean at m/K of its cost: more images then buy more than more timesteps per
    image, because which images are scored moves the loss more than which timesteps. Default: all K timesteps up
    to ``EVAL_PAIRS`` scored pairs, then as few as keep N * m >= EVAL_PAIRS (32 images: all 10; 1,000 images: 1).

    ``latents`` (N, C, H, W); ``context`` (1, L, D), the prompt's encoding; both on the device.
    """
    scheduler = c.scheduler
    k_all, n = num_timesteps, len(latents)
    m = min(k_all, -(-EVAL_PAIRS // n)) if timesteps_per_image is None else timesteps_per_image
    if not 1 <= m <= k_all:
        raise RunnerError(f"timesteps_per_image {m}: must be between 1 and num_eval_timesteps ({k_all})")
    noise, steps = eval_noise_and_timesteps(c.compute, scheduler.config.num_train_timesteps, tuple(latents.shape),
                                            k_all, seed)                                      # (K, N, ...), (K,)
    image = torch.arange(n, device=noise.device).expand(m, n)                                 # (m, N)
    grid_k = ((image + torch.arange(m, device=noise.device)[:, None]) % k_all).flatten()      # (m*N,)
    image = image.flatten()                                                                   # (m*N,)
    squared = []
    for i in range(0, m * n, batch_size):
        k, j = grid_k[i:i + batch_size], image[i:i + batch_size]
        x0, eps, t = latents[j], noise[k, j], steps[k]                                        # (b, C, H, W), .., (b,)
        noisy = scheduler.add_noise(x0, eps, t)
        with c.compute.autocast():
            pred = unet(noisy, t, context.expand(len(noisy), -1, -1)).sample
        error = pred.double() - training_target(scheduler, x0, eps, t).double()
        squared.append(error.pow(2).flatten(1).mean(-1).cpu())                               # (b,)
    return torch.cat(squared).view(m, n).mean(0)                                              # (N,)


def denoising_loss(c: Components, unet, latents: Tensor, context: Tensor, num_timesteps: int, seed: int = 1234,
                   batch_size: int = 64, timesteps_per_image: int | None = None) -> float:
    """The mean of :func:`denoising_losses` over the images (every image has the same number of elements)."""
    return float(denoising_losses(c, unet, latents, context, num_timesteps, seed, batch_size,
                                  timesteps_per_image).mean())


@torch.no_grad()
def sample(c: Components, unet, context: Tensor, uncond: Tensor, n: int, seed: int, steps: int = 25,
           guidance_scale: float = 1.0, batch_size: int = 32) -> Tensor:
    """``n`` images ``(n, C, H, W)`` in [-1, 1] for one prompt (DDIM from the training scheduler's config, with
    classifier-free guidance against ``uncond``, the empty prompt's encoding)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(c.scheduler.config)
    scheduler.set_timesteps(steps)
    size = int(unet.config.sample_size)
    g = torch.Generator().manual_seed(seed)
    latents = c.compute.randn((n, unet.config.in_channels, size, size), g) * scheduler.init_noise_sigma
    images = []
    for i in range(0, n, batch_size):
        x = latents[i:i + batch_size]
        guided = guidance_scale != 1.0       # 1: the conditional prediction alone (no second pass)
        both = torch.cat([uncond.expand(len(x), -1, -1), context.expand(len(x), -1, -1)]) if guided else \
            context.expand(len(x), -1, -1)
        for t in scheduler.timesteps:
            with c.compute.autocast():
                pred = unet(scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t), t, both).sample
            pred = pred.float()      # the DDIM update in float32 (a no-op without autocast)
            if guided:
                free, pred = pred.chunk(2)
                pred = free + guidance_scale * (pred - free)
            x = scheduler.step(pred, t, x).prev_sample
        images.append(to_pixels(c, x))
    return torch.cat(images)
