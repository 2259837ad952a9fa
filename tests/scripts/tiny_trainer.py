"""A tiny, fully deterministic Trainer run shared by the multi-process, fault and mixed-precision tests.

Used in-process by the tests and, through the scripts next to it, by ``torchrun`` / ``accelerate launch`` and by
subprocesses that are killed on purpose. No ``datasets`` import (the GPU image lacks it) and no dropout, so a run
depends only on the seed and the global batch (not on the number of processes it is split over).
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import Dataset

VOCAB = 100
SEQ_LEN = 12
NUM_EXAMPLES = 192


class TokenDataset(Dataset):
    """Random token ids; the label is learnable from the first three tokens."""

    def __init__(self, n: int = NUM_EXAMPLES, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, SEQ_LEN), generator=g)
        self.labels = (self.ids[:, :3].float().mean(1) > 50).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def tiny_model(seed: int = 0, r: int = 2, r_max: int = 12, tau: float = 0.1, dtype=None,
               target_params: int | None = None):
    """A 2-layer DeBERTa-v2 classifier (random weights, dropout off) with TDLRT adapters (``target_params``: in
    budget mode)."""
    from peft import get_peft_model
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    from tdrlt_peft import TuckerAdapterConfig

    torch.manual_seed(seed)
    config = DebertaV2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=64, num_labels=2, pad_token_id=0,
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base = DebertaV2ForSequenceClassification(config)
    # its forward takes **kwargs but its loss ignores num_items_in_batch: without this, transformers 5 multiplies
    # the loss by the number of processes and does not divide it by the gradient-accumulation steps
    base.accepts_loss_kwargs = False
    if dtype is not None:
        base = base.to(dtype)
    return get_peft_model(base, TuckerAdapterConfig(task_type="SEQ_CLS", r=r, r_max=r_max, tau=tau,
                                                    target_params=target_params))


def build_trainer(out_dir, per_device_batch: int = 16, max_steps: int = 12, seed: int = 0, callbacks=(),
                  model=None, use_cpu: bool = True, tdlrt_trainer: bool = False, **args_kw):
    """Trainer + TDLRTCallback (or ``TDLRTTrainer``) on ``tiny_model``; ``args_kw`` go to ``TrainingArguments``."""
    from transformers import Trainer, TrainingArguments

    from tdrlt_peft import TDLRTCallback, TDLRTTrainer

    settings = dict(learning_rate=1e-2, logging_steps=4, save_strategy="no", report_to="none", disable_tqdm=True)
    settings.update(args_kw)
    args = TrainingArguments(output_dir=str(out_dir), per_device_train_batch_size=per_device_batch,
                             max_steps=max_steps, use_cpu=use_cpu, seed=seed, **settings)
    model = tiny_model(seed) if model is None else model
    if tdlrt_trainer:
        return TDLRTTrainer(model=model, args=args, train_dataset=TokenDataset(seed=seed), callbacks=list(callbacks))
    return Trainer(model=model, args=args, train_dataset=TokenDataset(seed=seed),
                   callbacks=[TDLRTCallback(), *callbacks])


def adapter_state(model) -> dict[str, torch.Tensor]:
    """Every trained tensor: adapter tensors (``tdlrt_*``) and the classifier head (``modules_to_save``)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
            if "tdlrt_" in k or "modules_to_save" in k}


def subprocess_env() -> dict[str, str]:
    """Environment for scripts launched by the tests: repo importable, offline, one intra-op thread."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env
