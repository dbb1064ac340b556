"""peftlab's own LoRA: injection, freezing, merging, adapters, training and bf16."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.pytorch_utils import Conv1D

from peftlab.config import ConfigError, from_dict
from peftlab.methods import get_method
from peftlab.methods.lora import (
    LoraConfig,
    LoraLinear,
    adapter_names,
    apply_lora,
    count_parameters,
    disable_adapters,
    lora_layers,
    merge,
    merge_and_unload,
    set_adapter,
    unmerge,
)


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
VARIANTS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def perturb_magnitudes(model: torch.nn.Module, seed: int = 4) -> None:
    """Move every DoRA magnitude away from its initial value ||W + sBA||.

    At that value DoRA computes exactly what LoRA computes (m / ||W + sBA|| = 1), so a test
    that leaves it there cannot tell DoRA from LoRA, nor see a merge that drops m."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for m in layer.lora_magnitude_vector.values():
                m.mul_(0.5 + torch.rand(m.shape, generator=g))


# ----------------------------------------------------------------------------- injection


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_init_leaves_output_unchanged_and_only_lora_trains(arch, init, ids):
    model = MODELS[arch]()
    before = logits(model, ids)
    apply_lora(model, LoraConfig(r=4, init=init, use_dora=True))
    assert_close(logits(model, ids), before)

    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    lora_numel = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    n_trainable, n_total = count_parameters(model)
    assert n_trainable == lora_numel
    assert n_total == sum(p.numel() for p in model.parameters())


def test_names_match_peft_layout():
    model = tiny_llama()
    apply_lora(model, LoraConfig(r=4, use_dora=True))
    keys = set(model.state_dict())
    prefix = "model.layers.0.self_attn.q_proj"
    assert {f"{prefix}.base_layer.weight", f"{prefix}.lora_A.default.weight",
            f"{prefix}.lora_B.default.weight", f"{prefix}.lora_magnitude_vector.default"} <= keys
    assert f"{prefix}.weight" not in keys


def test_all_linear_targets_blocks_only():
    model = tiny_llama()
    apply_lora(model, LoraConfig(r=2))
    names = set(lora_layers(model))
    assert len(names) == 2 * 7  # q k v o gate up down in each of the 2 layers
    assert "lm_head" not in names

    bert = tiny_bert()
    apply_lora(bert, LoraConfig(r=2))
    names = set(lora_layers(bert))
    assert len(names) == 2 * 6 and "bert.pooler.dense" not in names and "classifier" not in names

    gpt2 = tiny_gpt2()
    apply_lora(gpt2, LoraConfig(r=2))
    layers = lora_layers(gpt2)
    assert len(layers) == 2 * 4 and all(layer.fan_in_fan_out for layer in layers.values())


def test_target_list_and_layers_to_transform():
    model = tiny_llama()
    apply_lora(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]))
    assert sorted(lora_layers(model)) == ["model.layers.1.self_attn.q_proj",
                                          "model.layers.1.self_attn.v_proj"]
    with pytest.raises(ValueError, match="nope"):
        apply_lora(tiny_llama(), LoraConfig(target_modules=["nope"]))


def test_rslora_scaling():
    assert LoraConfig(r=16, alpha=8).scaling == 0.5
    assert LoraConfig(r=16, alpha=8, use_rslora=True).scaling == 2.0
    model = tiny_llama()
    apply_lora(model, LoraConfig(r=16, alpha=8, use_rslora=True))
    assert all(layer.scaling["default"] == 2.0 for layer in lora_layers(model).values())


def test_config_validation_and_registry():
    for bad, key in [({"r": 0}, "method.r"), ({"dropout": 1.0}, "method.dropout"),
                     ({"init": "xavier"}, "method.init"), ({"alpha": 0}, "method.alpha")]:
        with pytest.raises(ConfigError, match=key):
            LoraConfig(**bad).validate("method")
        with pytest.raises(ConfigError, match=key):
            from_dict({"model": "x", "method": {"name": "lora", **bad}})
    cfg = from_dict({"model": "x", "method": {"name": "lora", "r": 4, "target_modules": ["q_proj"],
                                              "layers_to_transform": [0], "use_dora": True}}).method
    assert cfg == LoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[0], use_dora=True)
    method = get_method("lora")
    assert method.config_cls is LoraConfig and method.apply is apply_lora
    assert method.save is not None and method.load is not None


# ----------------------------------------------------------------------------- merging


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merge_unmerge(arch, variant, ids):
    model = MODELS[arch]()
    apply_lora(model, LoraConfig(r=4, init="random", **VARIANTS[variant]))
    perturb_magnitudes(model)  # no-op without DoRA
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    unmerged = logits(model, ids)

    merge(model)
    assert all(layer.merged_adapter == "default" for layer in lora_layers(model).values())
    assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=1e-5)
    unmerge(model)
    for n, p in model.named_parameters():
        if "base_layer" in n:
            assert_close(p, base_weights[n], atol=1e-5, rtol=1e-5)
    assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=1e-5)


def test_merge_and_unload(ids):
    model = tiny_gpt2()
    keys = set(model.state_dict())
    apply_lora(model, LoraConfig(r=4, init="random", use_dora=True))
    perturb_magnitudes(model)
    expected = logits(model, ids)
    out = merge_and_unload(model)
    assert out is model and not lora_layers(model)
    assert set(model.state_dict()) == keys
    assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_dora_forward_gradients_and_merge_follow_the_formula(kind):
    """DoRA against its definition, with m away from ||W + sBA|| (where DoRA equals LoRA):
    W' = m / ||W + sBA||_row (W + sBA), the norm detached from the graph (DoRA paper, 4.3)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10) if kind == "linear" else Conv1D(10, 12)
    with torch.no_grad():
        base.bias.normal_()
    layer = LoraLinear(base)
    layer.add_adapter("default", LoraConfig(r=3, alpha=6, init="random", use_dora=True))
    layer.active_adapter = "default"
    m = layer.lora_magnitude_vector["default"]
    with torch.no_grad():
        m.mul_(0.5 + torch.rand(m.shape))
    w = layer.base_weight().detach().clone()  # (out, in)
    a, b = (layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    x = torch.randn(4, 12)
    probe = torch.randn(4, 10)  # a random linear loss: every output gets its own gradient

    a_ref, b_ref, m_ref = (t.detach().clone().requires_grad_() for t in (a, b, m))
    adapted = w + 2.0 * b_ref @ a_ref  # scaling = alpha / r
    expected_w = (m_ref / adapted.norm(dim=1).detach()).view(-1, 1) * adapted
    expected = x @ expected_w.T + base.bias
    (expected * probe).sum().backward()

    out = layer(x)
    (out * probe).sum().backward()
    assert_close(out, expected.detach(), rtol=1e-5, atol=1e-6)
    lora_out = x @ (w + 2.0 * (b @ a)).T + base.bias  # what plain LoRA would give
    assert (out - lora_out).abs().max() > 0.1 * (out - (x @ w.T + base.bias)).abs().max()
    for ours, ref in ((a, a_ref), (b, b_ref), (m, m_ref)):
        assert_close(ours.grad, ref.grad, rtol=1e-5, atol=1e-6)

    with torch.no_grad():
        layer.merge()
        assert_close(layer.base_weight(), expected_w.detach(), rtol=1e-5, atol=1e-6)
        assert_close(layer(x), expected.detach(), rtol=1e-5, atol=1e-5)
        layer.unmerge()
        assert_close(layer.base_weight(), w, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- adapters


def test_disable_adapters_gives_base_output(ids):
    model = tiny_llama()
    base = logits(model, ids)
    apply_lora(model, LoraConfig(r=4, init="random", use_dora=True))
    perturb_magnitudes(model)
    adapted = logits(model, ids)
    assert not torch.allclose(adapted, base, atol=1e-3)
    with disable_adapters(model):
        assert_close(logits(model, ids), base)
    assert_close(logits(model, ids), adapted)

    merge(model)  # a merged model is unmerged for the block and merged back afterwards
    with disable_adapters(model):
        assert_close(logits(model, ids), base, atol=1e-5, rtol=1e-5)
    assert all(layer.merged_adapter for layer in lora_layers(model).values())
    assert_close(logits(model, ids), adapted, atol=1e-5, rtol=1e-5)


def test_two_named_adapters(ids):
    model = tiny_llama()
    base = logits(model, ids)
    apply_lora(model, LoraConfig(r=4, init="random"), adapter_name="a")
    out_a = logits(model, ids)
    # A second all-linear adapter must wrap the same modules, never the first one's lora_A/B.
    apply_lora(model, LoraConfig(r=2, init="random", layers_to_transform=[1]), adapter_name="b")
    out_b = logits(model, ids)
    layers = lora_layers(model)
    assert adapter_names(model) == ["a", "b"] and len(layers) == 14
    assert layers["model.layers.0.mlp.up_proj"].active_adapter is None  # b skips layer 0
    assert layers["model.layers.1.mlp.up_proj"].active_adapter == "b"
    assert not torch.allclose(out_a, out_b, atol=1e-3) and not torch.allclose(out_b, base, atol=1e-3)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".b." in n for n in trainable)  # only the active adapter trains
    set_adapter(model, "a")
    assert_close(logits(model, ids), out_a)
    assert all(".a." in n for n, p in model.named_parameters() if p.requires_grad)
    set_adapter(model, "b")
    assert_close(logits(model, ids), out_b)

    with pytest.raises(ValueError, match="unknown adapter"):
        set_adapter(model, "c")
    with pytest.raises(ValueError, match="already exists"):
        apply_lora(model, LoraConfig(r=2), adapter_name="a")
    with pytest.raises(ValueError, match="adapter name"):
        apply_lora(model, LoraConfig(r=2), adapter_name="x.y")
    merge(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        set_adapter(model, "a")


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_training_reduces_loss_and_only_lora_gets_gradients(variant):
    model = tiny_llama().train()
    apply_lora(model, LoraConfig(r=4, dropout=0.1, **VARIANTS[variant]))
    batch = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(2))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(8):
        torch.manual_seed(3)  # same dropout mask every step: a clean signal on a fixed batch
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (".lora_" in n), n


# ----------------------------------------------------------------------------- bf16


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_bf16_base_with_fp32_lora(arch, variant, ids):
    model = MODELS[arch]()
    apply_lora(model, LoraConfig(r=4, init="random", **VARIANTS[variant]))
    perturb_magnitudes(model)
    reference = logits(model, ids)
    for n, p in model.named_parameters():
        if ".lora_" not in n:
            p.data = p.data.to(torch.bfloat16)
    assert {p.dtype for n, p in model.named_parameters() if ".lora_" in n} == {torch.float32}

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = logits(model, ids)
    assert_close(out.float(), reference, atol=0.04, rtol=0)
    out = logits(model, ids)  # no autocast: bf16 activations, LoRA weights cast to bf16
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), reference, atol=0.04, rtol=0)

    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if ".lora_" in n]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_apply_to_bf16_model_keeps_lora_fp32(ids):
    # the same model and adapter in fp32 (same seed, same draws) is the reference
    reference = tiny_llama()
    apply_lora(reference, LoraConfig(r=4, init="random"))
    expected = logits(reference, ids)
    with disable_adapters(reference):
        effect = (expected - logits(reference, ids)).abs().max()  # ~0.57: what the adapter does

    model = tiny_llama().to(torch.bfloat16)
    apply_lora(model, LoraConfig(r=4, init="random"))
    layer = next(iter(lora_layers(model).values()))
    assert isinstance(layer, LoraLinear)
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert layer.lora_A["default"].weight.dtype == torch.float32
    out = logits(model, ids)
    assert out.dtype == torch.bfloat16
    # bf16 rounding moves the logits by ~0.01; an adapter lost (or doubled) on the bf16 path,
    # before or after merging, by ~effect. The tolerance is a tenth of the effect.
    assert (out.float() - expected).abs().max() < 0.1 * effect
    merge(model)  # merge in fp32, stored back as bf16
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert (logits(model, ids).float() - expected).abs().max() < 0.1 * effect
