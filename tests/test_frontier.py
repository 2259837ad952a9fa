"""The frontier sweep of the GLUE runner (benchmarks/glue/frontier.py) on a tiny random DeBERTa-v2: budgets counted
on the model, AdaLoRA's learning rate chosen on validation before its other seeds, a restart that runs nothing
twice, and the table and plot."""

import json

import pytest
from peft import LoraConfig, get_peft_model

from benchmarks.glue.frontier import BUDGET_FRACTIONS, chosen_adalora, grid, lora_shape, main
from benchmarks.glue.methods import default_target_modules, head_modules, load_backbone
from benchmarks.glue.rank_ablation import load

from ._tiny_models import build_tiny_deberta, write_glue_task


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    model = build_tiny_deberta(tmp_path_factory.mktemp("tiny-deberta"))
    data = tmp_path_factory.mktemp("glue") / "SST-2"
    write_glue_task(data, "sst2")
    return ["--task", "sst2", "--model", str(model), "--data_dir", str(data), "--num_train_epochs", "1",
            "--per_device_train_batch_size", "16", "--max_seq_length", "32", "--logging_steps", "1",
            "--learning_rate", "1e-3", "--r", "4", "--r_max", "8"]


def test_budgets_are_fractions_of_lora_r8_counted_on_the_model(base):
    shape = lora_shape(base)
    model = load_backbone(base[base.index("--model") + 1], "sst2", 0.0)
    lora = get_peft_model(model, LoraConfig(r=8, target_modules=default_target_modules(model),
                                            modules_to_save=head_modules(model)))
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert shape["lora_r8_adapter_params"] + shape["head_params"] == trainable
    budgets = {p.name: int(p.flags[p.flags.index("--target_params") + 1]) for p in grid([0], 1000)
               if "--target_params" in p.flags}
    assert budgets == {f"tdlrt_budget{round(100 * f)}": round(1000 * f) for f in BUDGET_FRACTIONS}


def test_sweep_chooses_adalora_on_validation_then_runs_its_seeds(base, tmp_path):
    out = tmp_path / "frontier"
    points = "adalora_r4_lr0.003,adalora_r4_lr0.01,tdlrt_budget50"
    assert main([str(out), "--seeds", "0", "1", "--points", points, "--", *base]) == 0
    selection = {f.name: load(str(f)) for f in out.glob("adalora_r4_lr*") if f.is_dir()}
    best = chosen_adalora(out)
    (other,) = set(selection) - {best.name}
    assert selection[best.name][0]["metrics"]["accuracy"] >= selection[other][0]["metrics"]["accuracy"]
    assert [r["seed"] for r in selection[best.name]] == [0, 1]  # seed 1 only at the chosen rate
    assert [r["seed"] for r in selection[other]] == [0]
    budget = load(str(out / "tdlrt_budget50"))
    assert [r["seed"] for r in budget] == [0, 1] and budget[0]["recipe"]["target_params"] == round(
        0.5 * json.loads((out / "frontier.json").read_text())["lora_r8_adapter_params"])
    table = (out / "frontier.md").read_text()
    assert f"| {best.name} | adalora | 0, 1 |" in table and "| tdlrt_budget50 | tdlrt | 0, 1 |" in table
    assert table.count("| adalora |") == 1 and (out / "frontier.png").is_file()
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*seed*.json")}
    assert main([str(out), "--seeds", "0", "1", "--points", points, "--", *base]) == 0  # a restart: nothing runs
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*seed*.json")} == stamps
