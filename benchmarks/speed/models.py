"""The benchmark's models, built from configs (random weights, no download), and the two adapter methods."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from tdrlt_peft import TDLRTIntegrator, TuckerAdapterConfig

# DeBERTa-v3-base (microsoft/deberta-v3-base config.json): the shapes, not the weights
DEBERTA_V3_BASE = dict(
    vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    max_position_embeddings=512, type_vocab_size=0, relative_attention=True, position_buckets=256,
    norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type=["p2c", "c2p"], layer_norm_eps=1e-7,
    max_relative_positions=-1, position_biased_input=False, pad_token_id=0, num_labels=2)
# the six linears of every encoder block: query/key/value/attention-output/intermediate/output
DEBERTA_TARGETS = r".*encoder\.layer\.\d+\..*(query_proj|key_proj|value_proj|dense)$"
# VGG16's convolutions ("M" = 2x2 max-pool)
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def deberta(num_layers: int, seed: int = 0) -> nn.Module:
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    torch.manual_seed(seed)
    return DebertaV2ForSequenceClassification(DebertaV2Config(**{**DEBERTA_V3_BASE, "num_hidden_layers": num_layers}))


class VGG(nn.Module):
    """VGG16 features (3x3 convs with ReLU, max-pools) and a linear head, for 32x32 images."""

    def __init__(self, plan=VGG16, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in plan:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU()]
                channels = item
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(self.features(images).flatten(1))       # (B, 512) after five pools of 32x32
        return nn.functional.cross_entropy(logits, labels)


def vgg(seed: int = 0) -> VGG:
    torch.manual_seed(seed)
    return VGG()


def conv_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


@dataclass
class Method:
    """A wrapped model with its optimizer (and, for TDLRT, the integrator that steps the adapters)."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    integrator: TDLRTIntegrator | None = None


def lora(model: nn.Module, targets, r: int, lr: float, task_type: str | None) -> Method:
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, task_type=task_type,
                        modules_to_save=None if task_type else ["classifier"])
    peft_model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    return Method("lora", peft_model, optimizer)


def tdlrt(model: nn.Module, targets, r: int, r_min: int, r_max: int, tau: float, lr: float, task_type: str | None,
          batched: bool = True, integrator_kwargs: dict | None = None) -> Method:
    """TDLRT adapters; ``integrator_kwargs`` go to ``TDLRTIntegrator`` (e.g. ``{"cuda_graph": True}``)."""
    config = TuckerAdapterConfig(r=r, r_min=r_min, r_max=r_max, tau=tau, target_modules=targets, task_type=task_type,
                                 modules_to_save=None if task_type else ["classifier"])
    peft_model = get_peft_model(model, config)
    integrator = TDLRTIntegrator(peft_model, batched=batched, **(integrator_kwargs or {}))
    optimizer = torch.optim.AdamW(integrator.other_trainable_parameters(), lr=lr)
    return Method("tdlrt", peft_model, optimizer, integrator)
