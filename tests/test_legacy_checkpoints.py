"""Checkpoints written by tdrlt_peft 0.1.0 (before the package layout and the step engine of issue #13) still load:
``tests/data/legacy_v0_1/`` was made by ``tests/data/make_legacy_checkpoint.py`` with that version; the outputs and
ranks it recorded must be reproduced exactly."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from peft import PeftModel

import tdrlt_peft

DATA = Path(__file__).parent / "data"
sys.path.insert(0, str(DATA))
from make_legacy_checkpoint import ConvNet, inputs  # noqa: E402

LEGACY = DATA / "legacy_v0_1"


def test_saved_adapter_of_0_1_loads_with_its_ranks_and_outputs():
    expected = torch.load(LEGACY / "adapter_expected.pt")
    torch.manual_seed(0)
    model = PeftModel.from_pretrained(ConvNet(), LEGACY / "adapter")
    model.eval()
    assert tdrlt_peft.adapter_ranks(model) == expected["ranks"]
    torch.testing.assert_close(model(inputs()), expected["output"], atol=1e-6, rtol=0)


def test_factorized_state_dict_of_0_1_loads_strictly():
    expected = torch.load(LEGACY / "factorized_expected.pt")
    torch.manual_seed(0)
    net = tdrlt_peft.factorize(ConvNet(), r=2, r_max=6, tau=0.05)
    net.load_state_dict(torch.load(LEGACY / "factorized_state_dict.pt"), strict=True)
    net.eval()
    assert {n: m.ranks for n, m in net.named_modules() if hasattr(m, "ranks")} == expected["ranks"]
    torch.testing.assert_close(net(inputs()), expected["output"], atol=1e-6, rtol=0)
