"""Writes ``tests/data/legacy_v0_1/``: checkpoints saved by tdrlt_peft 0.1.0 (before the package layout of issue
#13), which ``tests/test_legacy_checkpoints.py`` loads with the current code. Kept for the record; rerunning it
with a newer version would overwrite the fixture with that version's format.

    python tests/data/make_legacy_checkpoint.py
"""

from pathlib import Path

import torch
from peft import get_peft_model
from torch import nn

import tdrlt_peft
from tdrlt_peft import TDLRTIntegrator, TuckerAdapterConfig, factorize

OUT = Path(__file__).parent / "legacy_v0_1"


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.lin = nn.Linear(6 * 4 * 4, 12)
        self.head = nn.Linear(12, 2)

    def forward(self, x):
        return self.head(torch.relu(self.lin(torch.relu(self.conv(x)).flatten(1))))


def inputs():
    return torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(3))


def train(model, integrator, steps=4):
    x = inputs()
    y = torch.tensor([0, 1, 1, 0, 1])
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        integrator.step(0.05)
        for p in model.parameters():
            p.grad = None


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = get_peft_model(ConvNet(), TuckerAdapterConfig(target_modules=["conv", "lin"], r=2, r_max=6, tau=0.05))
    train(model, TDLRTIntegrator(model))
    model.eval()
    model.save_pretrained(OUT / "adapter")
    torch.save({"output": model(inputs()).detach(), "ranks": tdrlt_peft.adapter_ranks(model)},
               OUT / "adapter_expected.pt")

    torch.manual_seed(0)
    net = factorize(ConvNet(), r=2, r_max=6, tau=0.05)
    train(net, TDLRTIntegrator(net))
    net.eval()
    torch.save(net.state_dict(), OUT / "factorized_state_dict.pt")
    torch.save({"output": net(inputs()).detach(), "ranks": {n: m.ranks for n, m in net.named_modules()
                                                            if hasattr(m, "ranks")}}, OUT / "factorized_expected.pt")
    print(tdrlt_peft.__version__, tdrlt_peft.adapter_ranks(model), tdrlt_peft.adapter_ranks(net))


if __name__ == "__main__":
    main()
