"""PEFT conformance: the behaviours PEFT's common test-suite checks for every tuner (testing_common.py)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from peft import AutoPeftModelForSequenceClassification, PeftModel, get_peft_model
from torch import nn

import tdrlt_peft
from tdrlt_peft import IntegratorNotRunError, TDLRTIntegrator, TuckerAdapterConfig, adapter_ranks
from tdrlt_peft.layers.adapter import TDLRTLayer

from .helpers import MLP, tiny_deberta, train_steps
from .tolerances import IDENTITY

ATOL = IDENTITY[torch.float32]


def make(targets=("lin0", "lin1"), **kw):
    torch.manual_seed(0)
    kw.setdefault("tau", 0.1)      # small enough that a few steps move the ranks of this small MLP
    config = TuckerAdapterConfig(target_modules=list(targets), r=kw.pop("r", 2), r_max=kw.pop("r_max", 8), **kw)
    return get_peft_model(MLP(), config)


def trained(**kw):
    model = make(**kw)
    train_steps(model, TDLRTIntegrator(model))
    return model


X = torch.randn(6, 10, generator=torch.Generator().manual_seed(1))


def test_injects_only_into_targets():
    model = make(targets=["lin1"])
    assert isinstance(model.base_model.model.lin1, TDLRTLayer)
    assert type(model.base_model.model.lin0) is nn.Linear
    assert type(model.base_model.model.head) is nn.Linear


def test_only_adapters_and_modules_to_save_are_trainable():
    model = make(modules_to_save=["head"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing trainable"
    for name in trainable:
        assert ".tdlrt_" in name or "modules_to_save" in name, name


def test_output_at_init_equals_base_model():
    torch.manual_seed(0)
    base = MLP()
    expected = base(X)
    model = get_peft_model(base, TuckerAdapterConfig(target_modules=["lin0", "lin1"], r=2, r_max=8))
    torch.testing.assert_close(model(X), expected, atol=0, rtol=0)


def test_disable_merge_unmerge_unload_equalities():
    model = trained()
    model.eval()
    with torch.no_grad():
        adapted = model(X)
        with model.disable_adapter():
            base_out = model(X)
        assert (adapted - base_out).abs().max() > 1e-4, "training did not change the output"
        model.merge_adapter()
        torch.testing.assert_close(model(X), adapted, atol=ATOL, rtol=0)
        model.unmerge_adapter()
        torch.testing.assert_close(model(X), adapted, atol=ATOL, rtol=0)
        with model.disable_adapter():
            torch.testing.assert_close(model(X), base_out, atol=ATOL, rtol=0)
        unloaded = copy.deepcopy(model).unload()
        torch.testing.assert_close(unloaded(X), base_out, atol=ATOL, rtol=0)
        merged = model.merge_and_unload()
        assert not any(isinstance(m, TDLRTLayer) for m in merged.modules())
        torch.testing.assert_close(merged(X), adapted, atol=ATOL, rtol=0)


def test_save_load_exact_after_ranks_changed(tmp_path):
    model = trained(r=2, r_max=8)
    ranks = adapter_ranks(model)
    assert any(r != (2, 2) for r in ranks.values()), f"ranks did not change: {ranks}"
    model.eval()
    expected = model(X)
    model.save_pretrained(tmp_path)
    saved = tdrlt_peft.TuckerAdapterConfig.from_pretrained(tmp_path)
    assert saved.rank_pattern == {k.removeprefix("base_model.model."): v[0] for k, v in ranks.items()}
    torch.manual_seed(0)
    base_again = MLP()         # same base weights as `model`
    torch.manual_seed(123)     # a different adapter init: loading must overwrite all of it
    loaded = PeftModel.from_pretrained(base_again, tmp_path).eval()
    assert adapter_ranks(loaded) == ranks
    torch.testing.assert_close(loaded(X), expected, atol=0, rtol=0)


def test_saved_adapter_is_compact(tmp_path):
    from safetensors.torch import load_file

    model = trained(r=2, r_max=8)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    for name, ranks in adapter_ranks(model).items():
        key = name + ".tdlrt_S"
        assert tuple(tensors[key].shape) == ranks, (key, tensors[key].shape, ranks)


def test_second_adapter_set_and_delete():
    model = trained()
    model.eval()
    first = model(X).detach()
    model.add_adapter("other", TuckerAdapterConfig(target_modules=["lin0", "lin1"], r=3, r_max=8))
    model.set_adapter("other")
    assert model.active_adapter == "other"
    train_steps(model, TDLRTIntegrator(model), seed=5)
    model.eval()
    other = model(X).detach()
    assert (other - first).abs().max() > 1e-4
    model.set_adapter("default")
    torch.testing.assert_close(model(X), first, atol=0, rtol=0)
    model.delete_adapter("other")
    assert all("other" not in m.tdlrt_S for m in model.modules() if isinstance(m, TDLRTLayer))


def test_deepcopy_and_pickle_preserve_outputs():
    model = trained().eval()
    expected = model(X)
    torch.testing.assert_close(copy.deepcopy(model)(X), expected, atol=0, rtol=0)
    torch.testing.assert_close(pickle.loads(pickle.dumps(model))(X), expected, atol=0, rtol=0)


def test_print_trainable_parameters_counts_active_sizes():
    model = make(r=2, r_max=8)
    trainable, _ = model.get_nb_trainable_parameters()
    # lin0 (20 x 10), lin1 (20 x 20) at rank 2: (out + in) r + r^2
    assert trainable == (20 + 10) * 2 + 4 + (20 + 20) * 2 + 4
    assert tdrlt_peft.count_active_parameters(model) == trainable


def test_missing_integrator_step_fails_loudly():
    model = make()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    model(X).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    with pytest.raises(IntegratorNotRunError, match="TDLRTCallback"):
        model(X)


def test_gradient_accumulation_is_not_flagged():
    model = make()
    integrator = TDLRTIntegrator(model)
    model.train()
    for _ in range(3):                 # three micro-batches accumulate into .grad
        model(X).pow(2).mean().backward()
    assert integrator.step(0.01)
    model(X).pow(2).mean().backward()


def test_gradient_checkpointing_gives_same_gradients():
    def grads(checkpointing: bool):
        model = get_peft_model(tiny_deberta(), TuckerAdapterConfig(task_type="SEQ_CLS", r=2, r_max=8))
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, TDLRTLayer):
                    m.tdlrt_S["default"][:2, :2] = 0.1
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        ids = torch.randint(1, 100, (4, 12), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and any(".tdlrt_U" in n for n in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=ATOL, rtol=0)


def test_bf16_autocast_forward_backward_and_step():
    model = make()
    integrator = TDLRTIntegrator(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(X)
    out.float().pow(2).mean().backward()
    assert model.base_model.model.lin0.tdlrt_U["default"].grad.dtype == torch.float32
    assert integrator.step(0.01)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_auto_peft_model_loads_registered_method(tmp_path):
    base = tiny_deberta()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, TuckerAdapterConfig(task_type="SEQ_CLS", r=2, r_max=8))
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter")
    assert isinstance(loaded, PeftModel)
    assert loaded.peft_config["default"].peft_type == "TDLRT"
    assert any(isinstance(m, TDLRTLayer) for m in loaded.modules())


def test_default_targets_are_attention_and_feed_forward_linears():
    model = get_peft_model(tiny_deberta(), TuckerAdapterConfig(task_type="SEQ_CLS"))
    names = sorted(n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, TDLRTLayer))
    assert len(names) == 12   # 6 per layer x 2 layers
    assert not any("pooler" in n or "classifier" in n
                   for n, m in model.named_modules() if isinstance(m, TDLRTLayer))


@pytest.mark.parametrize("kwargs,field", [
    ({"tau": 1.0}, "tau"), ({"tau": -0.1}, "tau"), ({"r_min": 5, "r_max": 4, "r": 4}, "r_max"),
    ({"r": 40, "r_max": 32}, "r"), ({"r_min": 0}, "r_min"), ({"core_optimizer": "lion"}, "core_optimizer"),
    ({"dropout": 1.0}, "dropout"), ({"bias": "lora_only"}, "bias"),
])
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"TuckerAdapterConfig\.{field}="):
        TuckerAdapterConfig(target_modules=["lin0"], **kwargs)


def test_unsupported_layer_type_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.Embedding(10, 4))
    with pytest.raises(ValueError, match="Embedding"):
        get_peft_model(model, TuckerAdapterConfig(target_modules=["1"]))


def test_unknown_target_modules_are_reported():
    with pytest.raises(ValueError, match="nonexistent"):
        get_peft_model(MLP(), TuckerAdapterConfig(target_modules=["nonexistent"]))


def test_merge_and_unload_with_weightless_module_to_save():
    """modules_to_save naming a module without .weight (BERT's pooler) survives merge_and_unload."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    model = get_peft_model(BertForSequenceClassification(config),
                           TuckerAdapterConfig(task_type="SEQ_CLS", r=2, r_max=8, modules_to_save=["pooler"]))
    model.eval()
    ids = torch.randint(1, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.base_model.model.bert.pooler.modules_to_save["default"].dense.weight.add_(0.1)
        expected = model(input_ids=ids).logits
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=ATOL, rtol=0)
