"""The frontier sweep of the GLUE runner (benchmarks/glue/frontier.py) on a tiny random DeBERTa-v2 and the real
debates data: budgets counted on the model, AdaLoRA's learning rate chosen on validation before its reported runs,
a refused choice where the only held-out split is the reported one, a restart that runs nothing twice, the table."""

import json

import pytest
from peft import LoraConfig, get_peft_model

from benchmarks.glue.frontier import ADALORA_LRS, BUDGET_FRACTIONS, chosen_adalora, grid, lora_shape, main
from benchmarks.glue.methods import default_target_modules, head_modules, load_backbone
from benchmarks.glue.rank_ablation import load

from ._tiny_models import build_tiny_deberta, write_glue_task

SELECT = ",".join(f"adalora_r4_lr{lr:g}_select" for lr in ADALORA_LRS)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(build_tiny_deberta(tmp_path_factory.mktemp("tiny-deberta")))


def flags(model, *data):
    return ["--task", "sst2", "--model", model, *data, "--num_train_epochs", "1", "--per_device_train_batch_size",
            "16", "--max_seq_length", "32", "--logging_steps", "1", "--learning_rate", "1e-3", "--r", "4",
            "--r_max", "8"]


def debates(model):
    return flags(model, "--dataset", "debates", "--max_train_samples", "32", "--max_eval_samples", "16")


def test_budgets_are_fractions_of_lora_r8_counted_on_the_model(model):
    shape = lora_shape(debates(model))
    backbone = load_backbone(model, "sst2", 0.0)
    lora = get_peft_model(backbone, LoraConfig(r=8, target_modules=default_target_modules(backbone),
                                               modules_to_save=head_modules(backbone)))
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert shape["lora_r8_adapter_params"] + shape["head_params"] == trainable
    budgets = {p.name: int(p.flags[p.flags.index("--target_params") + 1]) for p in grid([0], 1000)
               if "--target_params" in p.flags}
    assert budgets == {f"tdlrt_budget{round(100 * f)}": round(1000 * f) for f in BUDGET_FRACTIONS}


def test_sweep_chooses_adalora_on_validation_then_runs_its_seeds(model, tmp_path):
    out = tmp_path / "frontier"
    argv = [str(out), "--seeds", "0", "1", "--points", f"{SELECT},tdlrt_budget50", "--", *debates(model)]
    assert main(argv) == 0
    selection = {lr: load(str(out / f"adalora_r4_lr{lr:g}_select")) for lr in ADALORA_LRS}
    assert all([r["seed"] for r in runs] == [0] for runs in selection.values())  # seed 0 only
    lr = chosen_adalora(out)
    best = max(r[0]["metrics"]["validation_accuracy"] for r in selection.values())
    assert selection[lr][0]["metrics"]["validation_accuracy"] == best
    reported = load(str(out / "adalora_r4"))
    assert [r["seed"] for r in reported] == [0, 1] and {r["learning_rate"] for r in reported} == {lr}
    assert reported[0] == selection[lr][0]  # the same command: its run is reused
    budget = load(str(out / "tdlrt_budget50"))
    assert [r["seed"] for r in budget] == [0, 1] and budget[0]["recipe"]["target_params"] == round(
        0.5 * json.loads((out / "frontier.json").read_text())["lora_r8_adapter_params"])
    table = (out / "frontier.md").read_text()
    assert "| adalora_r4 | adalora | 0, 1 |" in table and "| tdlrt_budget50 | tdlrt | 0, 1 |" in table
    assert "_select |" not in table and (out / "frontier.png").is_file()
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*seed*.json")}
    assert main(argv) == 0  # a restart: nothing runs again
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*seed*.json")} == stamps


def test_choosing_on_the_reported_split_is_refused(model, tmp_path):
    data = tmp_path / "SST-2"
    write_glue_task(data, "sst2")  # GLUE dev is its only held-out split
    with pytest.raises(SystemExit, match="no validation split.*--selection_flags='--dataset rotten_tomatoes_tuning'"):
        main([str(tmp_path / "frontier"), "--seeds", "0", "--points", SELECT, "--",
              *flags(model, "--data_dir", str(data))])
