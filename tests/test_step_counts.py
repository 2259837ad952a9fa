"""Issue #13 count targets for one ``TDLRTIntegrator.step``, the counter behind them, and ``gpu_check``.

Counter: ``benchmarks/speed/counts.py``; GPU check: ``benchmarks/speed/gpu_check.sh`` (its parts run on CPU).

Targets on CPU, 6-layer MiniLM-shaped model (36 adapters on the six linears, 3 shapes, 8 distinct ranks), per
step and for both core optimizers: <= 300 compute ops, <= 12 linear-algebra calls, no host read; 72 adapters
at most 10 % more ops than 36. The op target is for the grouping a GPU step runs (``"padded"``: one group for
every matrix adapter); the CPU's default (``"shape"``: a group per storage shape, fewer flops) is checked for
everything else and held under its earlier count. ``python -m benchmarks.speed --counts`` prints the same numbers
with the sweep.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.speed.count_sweep import TARGETS, check_targets
from benchmarks.speed.counts import count_ops, host_read_kind, names
from benchmarks.speed.minilm import MINILM_TARGETS, count_minilm_step, minilm, minilm_tdlrt

# ----------------------------------------------------------------------------- the counter itself


def test_counter_counts_one_item_and_one_svd():
    x = torch.randn(4, 3)

    def fn():
        s = torch.linalg.svd(x).S            # aten::_linalg_svd
        x.t()                                # views: not compute
        x.view(12)
        return s.sum().item()                # aten::sum, aten::_local_scalar_dense

    _, c = count_ops(fn)
    assert c.compute_ops == 3 and c.views == 2
    assert dict(c.linalg) == {"_linalg_svd": 1}
    assert dict(c.host_reads) == {"_local_scalar_dense": 1}


def test_counter_classifies_host_reads_linalg_and_views():
    x, spd = torch.randn(5), torch.eye(3) * 2

    def fn():
        bool(x[0] > 0)                        # select (view), gt, _local_scalar_dense
        x[x > 0]                              # gt, index with a boolean mask
        x.nonzero()
        x.tolist()                            # nothing dispatched on CPU: counted by the function mode
        torch.linalg.cholesky(spd)            # linalg_cholesky_ex + _linalg_check_errors (a host read)
        torch.linalg.vector_norm(x)           # a plain reduction, not linear algebra
        torch.linalg.qr(spd)
        y = x.clone()
        y.add_(1)                             # in-place: compute, not a view
        y.unsqueeze(0).expand(2, 5)

    _, c = count_ops(fn)
    assert dict(c.linalg) == {"linalg_cholesky_ex": 1, "linalg_qr": 1}
    assert dict(c.host_reads) == {"_local_scalar_dense": 1, "index(bool mask)": 1, "nonzero": 1, "tolist": 1,
                                  "_linalg_check_errors": 1}
    assert c.views == 3                       # select, unsqueeze, expand
    assert c.ops["add_"] == 1 and c.ops["linalg_vector_norm"] == 1 and "select" not in c.ops
    assert c.compute_ops == sum(c.ops.values()) == 11


def test_copies_to_the_host_are_reads_only_from_another_device():
    to_copy = torch.ops.aten._to_copy.default
    on_device, on_host = torch.empty(2, device="meta"), torch.empty(2)
    assert host_read_kind(to_copy, (on_device,), {"device": torch.device("cpu")}, on_host) == "_to_copy(to cpu)"
    assert host_read_kind(to_copy, (on_host,), {"device": torch.device("cpu")}, on_host) is None
    assert host_read_kind(torch.ops.aten.copy_.default, (on_host, on_device), {}, on_host) == "copy_(to cpu)"


# ----------------------------------------------------------------------------- the model of the targets


def test_minilm_model_has_36_adapters_in_3_shapes_with_8_distinct_ranks():
    from tdrlt_peft.tuner.config import TRANSFORMERS_MODELS_TO_TDLRT_TARGET_MODULES_MAPPING as DEFAULTS

    model = minilm_tdlrt(num_layers=6, distinct_ranks=8)
    storages = [m for m in model.modules() if callable(getattr(m, "tdlrt_storages", None))]
    linears = [n for n, m in minilm(6).named_modules() if isinstance(m, torch.nn.Linear) and ".layer." in n]
    assert len(linears) == len(storages) == 36
    assert {tuple(m.base_layer.weight.shape) for m in storages} == {(384, 384), (1536, 384), (384, 1536)}
    import tdrlt_peft

    ranks = tdrlt_peft.adapter_ranks(model)
    assert len(ranks) == 36 and {r for rs in ranks.values() for r in rs} == set(range(1, 9))
    # the issue's target list adapts exactly what the default BERT targets adapt
    import re

    default = [n for n in linears if re.fullmatch(DEFAULTS["bert"], n)]
    issue = [n for n in linears if any(n == t or n.endswith("." + t) for t in MINILM_TARGETS)]
    assert default == issue == linears


# ----------------------------------------------------------------------------- the targets (issue #13)


# before the padded grouping and the fused moments: 815 (adam) / 394 (sgd) ops per step, grouped by shape
SHAPE_GROUPING_BEFORE = {"adam": 815, "sgd": 394}


@pytest.fixture(scope="module", params=[(o, g) for g in ("padded", "shape") for o in ("adam", "sgd")],
                ids=lambda p: "-".join(p))
def counts(request) -> tuple[str, dict, dict]:
    torch.manual_seed(0)
    optimizer, grouping = request.param
    return (grouping, count_minilm_step(6, 8, optimizer, grouping=grouping),
            count_minilm_step(12, 8, optimizer, grouping=grouping))


def _detail(c: dict) -> str:
    return (f"{c['num_adapters']} adapters, {c['core_optimizer']}, {c['grouping']}: {c['compute_ops']} ops, linalg "
            f"{names(c['linalg'])}, host reads {names(c['host_read_ops'])}")


def test_step_has_at_most_300_compute_ops(counts):
    grouping, c36, _ = counts
    assert c36["stepped"] and c36["num_adapters"] == 36 and c36["distinct_ranks"] == 8
    if grouping == "padded":
        assert c36["compute_ops"] <= TARGETS["compute_ops"], _detail(c36)
    else:                                       # three groups: about three times the padded count, and less than
        assert c36["compute_ops"] < SHAPE_GROUPING_BEFORE[c36["core_optimizer"]], _detail(c36)


def test_step_has_at_most_12_linalg_calls(counts):
    _, c36, _ = counts
    assert c36["linalg_calls"] <= TARGETS["linalg_calls"], _detail(c36)


def test_step_has_no_host_read(counts):
    _, c36, c72 = counts
    assert c36["host_reads"] == 0, _detail(c36)
    assert c72["host_reads"] == 0, _detail(c72)


def test_doubling_the_layers_adds_at_most_10_percent_ops(counts):
    _, c36, c72 = counts
    assert c72["num_adapters"] == 72
    check = check_targets(c36, c72)["doubling_growth"]
    assert check["ok"], f"{100 * check['value']:+.1f} % ops from 36 to 72 adapters; {_detail(c36)}; {_detail(c72)}"


# ----------------------------------------------------------------------------- gpu_check.sh and its parts


def test_gpu_check_script_is_valid_bash():
    import subprocess
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "speed" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


def test_gpu_check_summary_compares_every_part_with_its_target(tmp_path):
    import json

    from benchmarks.speed.gpu_check import summary

    base = {"step_ratio": 1.05, "integrator_share": 0.08}
    (tmp_path / "step_minilm.json").write_text(json.dumps(
        {"baseline": base, "cuda_graph": {"unavailable": "not accepted by TDLRTIntegrator yet"}}))
    check = {"compute_ops": {"value": 250, "target": 300, "ok": True}}
    (tmp_path / "counts.json").write_text(json.dumps({"check": {"adam": check}, "points": {"36 adam": {}}}))
    (tmp_path / "glue_demo").mkdir()
    for method, seconds in (("tdlrt", 12.0), ("lora", 10.0)):
        (tmp_path / "glue_demo" / f"{method}.json").write_text(json.dumps(
            {"method": method, "train_seconds": seconds}))
    table, verdict = summary(tmp_path)
    assert verdict["minilm: step TDLRT / LoRA"] is True
    assert verdict["minilm: integrator share of step"] is False
    assert verdict["minilm: step TDLRT / LoRA, cuda_graph"] is None and "not accepted" in table
    assert verdict["deberta: step TDLRT / LoRA"] is None and "missing" in table
    assert verdict["counts adam: compute_ops"] is True
    assert verdict["GLUE demo: train time TDLRT / LoRA"] is False           # 1.2 > 1.10


@pytest.mark.slow
def test_gpu_check_step_part_runs_on_cpu(tmp_path):
    import json

    from benchmarks.speed.gpu_check import main

    assert main(["step", "--model", "minilm", "--cuda-graph", "--device", "cpu", "--quick", "--out",
                 str(tmp_path)]) == 0
    result = json.loads((tmp_path / "step_minilm.json").read_text())
    assert result["baseline"]["step_ratio"] > 0 and 0 < result["baseline"]["integrator_share"] < 1
    assert result["baseline"]["integrator_counts"]["compute_ops"] > 0
    assert "step_ratio" in result["cuda_graph"] or "unavailable" in result["cuda_graph"]
