"""The compression benchmark's ablation of ranks that keep adapting: the class-shift batch schedule, ranks frozen at
a fraction of the run against free ranks, the validation split (real Fashion-MNIST, LeNet-5, seconds)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks.compression import BenchmarkError
from benchmarks.compression.data import find_data_dir, load_split
from benchmarks.compression.train import SHIFT_CLASSES, batches


def plain_epochs(labels, batch_size, epochs, seed):
    generator = torch.Generator().manual_seed(seed)
    return [b for _ in range(epochs) for b in torch.randperm(len(labels), generator=generator).split(batch_size)]


def test_batches_without_shift_are_the_plain_shuffled_epochs():
    labels = torch.arange(100) % 10
    got = list(batches(labels, 16, 3, torch.Generator().manual_seed(4)))
    want = plain_epochs(labels, 16, 3, 4)
    assert len(got) == len(want) == 3 * 7
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_class_shift_keeps_the_first_fraction_of_the_steps_on_the_first_classes():
    labels = torch.arange(100) % 10
    got = list(batches(labels, 16, 3, torch.Generator().manual_seed(0), class_shift=0.5))
    total, first = 3 * 7, math.ceil(0.5 * 3 * 7)
    assert len(got) == total
    assert all((labels[b] < SHIFT_CLASSES).all() for b in got[:first])
    late = torch.cat(got[first:])
    assert (labels[late] >= SHIFT_CLASSES).any() and (labels[late] < SHIFT_CLASSES).any()
    assert sorted(torch.cat(got[first:first + 7]).tolist()) == list(range(100))   # then whole epochs


def fashion_mnist():
    try:
        return find_data_dir(None)
    except BenchmarkError:
        pytest.fail("Fashion-MNIST is not installed: apt-get install -y dataset-fashion-mnist (README set-up)")


def test_validation_images_are_training_images_outside_the_training_subset():
    folder = fashion_mnist()
    x_train, _ = load_split(folder, "train", 500, seed=0)
    x_val, _ = load_split(folder, "train", 300, seed=0, offset=500)
    x_both, _ = load_split(folder, "train", 800, seed=0)
    assert torch.equal(torch.cat([x_train, x_val]), x_both)


def test_frozen_ranks_stop_moving_and_pair_with_the_free_run(tmp_path):
    """Free and frozen-at-25 % TDLRT runs with a class shift and interval 2: the frozen run's ranks move only up to
    the freeze step, the free run's also after it and are recorded at truncation steps only (exact ranks, not the
    widths a layer slices with right after a step), and the report pairs them."""
    fashion_mnist()
    from benchmarks.compression.__main__ import main

    argv = ["--networks", "lenet5", "--methods", "tdlrt", "tucker-gd", "--taus", "0.3", "--seeds", "1",
            "--epochs", "2", "--train-size", "1024", "--test-size", "500", "--validation-size", "300",
            "--rank-freeze-fractions", "0.25", "--class-shift", "0.5", "--truncation-interval", "2",
            "--workers", "1", "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    runs = {json.loads(p.read_text())["label"]: json.loads(p.read_text()) for p in (tmp_path / "runs").iterdir()}
    free, frozen = runs["TDLRT Tucker (tau=0.3)"], runs["TDLRT Tucker (tau=0.3, ranks frozen at 25 %)"]
    total = 2 * 1024 // 128
    assert frozen["freeze"] == 0.25 and free["freeze"] is None
    last_decision = math.ceil(0.25 * total) // 2 * 2          # the last truncation step at or before the freeze
    assert frozen["rank_changes"] and all(step <= last_decision + 1 for step, *_ in frozen["rank_changes"])
    assert any(step > last_decision + 1 for step, *_ in free["rank_changes"])
    assert all((step - 1) % 2 == 0 or step == total for step, *_ in free["rank_changes"])
    assert runs["Tucker fixed-rank GD (ranks of tau=0.3)"]["ranks"] == free["ranks"]
    assert 0 < free["validation_accuracy"] <= 1 and free["validation_size"] == 300 and free["class_shift"] == 0.5
    table = (tmp_path / "results.md").read_text()
    assert "validation acc. (%)" in table and "| lenet5 | 0.3 | 25 % | 1 |" in table
    assert "classes 0-4 only for the first 50 % of the steps" in table


def test_budget_runs_stay_within_their_budget_and_an_unreachable_one_fails_fast(tmp_path, capsys):
    fashion_mnist()
    from benchmarks.compression.__main__ import main

    common = ["--networks", "lenet5", "--methods", "tdlrt", "--taus", "0.3", "--seeds", "1", "--epochs", "1",
              "--train-size", "512", "--test-size", "200", "--workers", "1", "--output-dir", str(tmp_path)]
    assert main(common + ["--target-params", "10"]) == 2
    assert "cannot be met" in capsys.readouterr().err and not (tmp_path / "runs").exists()
    assert main(common + ["--target-params", "1500"]) == 0
    run = json.loads((tmp_path / "runs" / "lenet5_tdlrt-tucker-budget-1500_seed0.json").read_text())
    dense_first_conv = 1 * 20 * 5 * 5                      # not factorized, not in the budget
    assert run["target_params"] == 1500 and run["conv_params"] - dense_first_conv <= 1500
    assert "TDLRT Tucker (budget 1500)" in (tmp_path / "results.md").read_text()
