"""Smoke run of the speed benchmark (``python -m benchmarks.speed --quick``; slow, opt-in: ``pytest -m slow``)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_quick_speed_benchmark_writes_ratios_json_and_plot(tmp_path):
    from benchmarks.speed.__main__ import main

    assert main(["--quick", "--output-dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "speed_cpu.json").read_text())
    for name in ("deberta", "vgg16"):
        run = results["training"][name]
        assert run["ratio"]["total"] > 0 and run["ratio"]["peak_memory"] > 0
        # LoRA's "integrator" phase is two clock reads with nothing between them
        assert run["tdlrt"]["median_s"]["integrator"] > run["lora"]["median_s"]["integrator"]
        assert run["tdlrt"]["memory_bytes"]["step_growth"] > 0
    assert results["training"]["deberta"]["num_adapters"] == 12
    assert results["training"]["deberta"]["tdlrt_ranks"]["mean"] == 8
    sweep = results["scaling"]
    assert [p["num_adapters"] for p in sweep["against_adapters"]] == [12, 24]
    assert all(p["batched_s"] > 0 and p["per_adapter_s"] > 0 for p in sweep["against_rank"])
    assert (tmp_path / "integrator_scaling_cpu.png").stat().st_size > 0
    assert "TDLRT / LoRA" in (tmp_path / "speed_cpu.md").read_text()
