"""Bottleneck adapters: placement, identity at init, the maths, adapters, save/load, training."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.testing import assert_close

from peftlab.config import ConfigError, from_dict
from peftlab.methods import get_method, method_for_adapter_dir
from peftlab.methods.adapter import (
    AdapterConfig,
    AdapterLayer,
    adapter_layers,
    adapter_names,
    apply_adapter,
    disable_adapters,
    load_adapter,
    save_adapter,
    set_adapter,
)
from peftlab.methods.lora import count_parameters
from peftlab.runtime.precision import prepare_precision
from tests.test_full_freeze import IDS, MODELS, logits, tiny_bert, tiny_llama, train_steps

HIDDEN = 32
# Block-relative (attention output, FFN output) per tiny model.
PLACES = {
    "llama": ("model.layers.{i}", "self_attn.o_proj", "mlp.down_proj"),
    "gpt2": ("transformer.h.{i}", "attn.c_proj", "mlp.c_proj"),
    "bert": ("bert.encoder.layer.{i}", "attention.output.dense", "output.dense"),
}
KINDS = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")


def wrapped(arch: str, variant: str) -> list[str]:
    block, attn, ffn = PLACES[arch]
    paths = (attn, ffn) if variant == "houlsby" else (ffn,)
    return [f"{block.format(i=i)}.{p}" for i in (0, 1) for p in paths]


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def adapter_params(modules: list[str], name: str = "default") -> set[str]:
    return {f"{m}.adapter_{ud}.{name}.{w}" for m in modules for ud in ("down", "up")
            for w in ("weight", "bias")}


# ----------------------------------------------------------------------------- the layer


@pytest.mark.parametrize("act", ["relu", "gelu", "silu", "tanh"])
@pytest.mark.parametrize("residual", [True, False])
def test_adapter_layer_matches_the_formula(act, residual):
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = AdapterLayer(base)
    layer.add_adapter("a", AdapterConfig(reduction_factor=4, non_linearity=act, residual=residual,
                                         init="random"))
    layer.active_adapter = "a"
    x = torch.randn(3, 5, 16)
    h = x @ base.weight.T + base.bias
    d, u = layer.adapter_down["a"], layer.adapter_up["a"]
    assert d.weight.shape == (2, 8) and u.weight.shape == (8, 2)
    fn = {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}[act]
    z = fn(h @ d.weight.T + d.bias) @ u.weight.T + u.bias
    assert_close(layer(x), h + z if residual else z)
    assert z.abs().max() > 1e-3  # the adapter really contributes


def test_near_zero_init_is_small_down_and_zero_up():
    torch.manual_seed(0)
    layer = AdapterLayer(nn.Linear(64, 64))
    layer.add_adapter("a", AdapterConfig())
    d, u = layer.adapter_down["a"], layer.adapter_up["a"]
    assert d.weight.shape == (4, 64)  # 64 // 16
    assert 0 < d.weight.std() < 0.02 and torch.count_nonzero(d.bias) == 0
    assert torch.count_nonzero(u.weight) == 0 and torch.count_nonzero(u.bias) == 0


# ----------------------------------------------------------------------------- injection


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("variant", ["houlsby", "pfeiffer"])
def test_identity_at_init_and_only_adapters_train(arch, variant):
    model = MODELS[arch]()
    before = logits(model)
    apply_adapter(model, AdapterConfig(variant=variant, reduction_factor=4))
    assert_close(logits(model), before)
    assert sorted(adapter_layers(model)) == sorted(wrapped(arch, variant))
    assert trainable(model) == adapter_params(wrapped(arch, variant))
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".adapter_" not in n)


@pytest.mark.parametrize("arch", list(MODELS))
def test_houlsby_adds_two_adapters_per_block_pfeiffer_one(arch):
    counts = {}
    for variant in ("houlsby", "pfeiffer"):
        model = MODELS[arch]()
        apply_adapter(model, AdapterConfig(variant=variant, reduction_factor=4))
        per_block = [sum(1 for n in adapter_layers(model) if n.startswith(PLACES[arch][0].format(i=i) + "."))
                     for i in (0, 1)]
        counts[variant] = per_block
        b = HIDDEN // 4
        per_adapter = HIDDEN * b + b + b * HIDDEN + HIDDEN
        n_train, n_total = count_parameters(model)
        assert n_train == 2 * per_block[0] * per_adapter
        assert n_total == sum(p.numel() for p in MODELS[arch]().parameters()) + n_train
    assert counts == {"houlsby": [2, 2], "pfeiffer": [1, 1]}


def test_layers_to_transform_picks_blocks():
    model = tiny_llama()
    apply_adapter(model, AdapterConfig(variant="houlsby", layers_to_transform=[1]))
    assert sorted(adapter_layers(model)) == ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.o_proj"]
    with pytest.raises(ValueError, match=r"layers_to_transform: LlamaForCausalLM has no block \[4\]"):
        apply_adapter(tiny_llama(), AdapterConfig(layers_to_transform=[4]))


@pytest.mark.parametrize("arch", list(MODELS))
def test_disable_gives_the_base_output(arch):
    model = MODELS[arch]()
    base = logits(model)
    apply_adapter(model, AdapterConfig(variant="houlsby", reduction_factor=4, init="random"))
    adapted = logits(model)
    assert not torch.allclose(adapted, base)
    with disable_adapters(model):
        assert_close(logits(model), base)
    assert_close(logits(model), adapted)


def test_several_named_adapters_and_switching():
    model = tiny_llama()
    apply_adapter(model, AdapterConfig(variant="pfeiffer", reduction_factor=4, init="random"), "a")
    out_a = logits(model)
    torch.manual_seed(7)
    apply_adapter(model, AdapterConfig(variant="houlsby", reduction_factor=8, init="random"), "b")
    out_b = logits(model)
    assert sorted(adapter_names(model)) == ["a", "b"]
    assert not torch.allclose(out_a, out_b)
    assert trainable(model) == adapter_params(wrapped("llama", "houlsby"), "b")

    set_adapter(model, "a")
    assert_close(logits(model), out_a)  # pfeiffer's "a" leaves o_proj (which only "b" has) as base
    assert trainable(model) == adapter_params(wrapped("llama", "pfeiffer"), "a")
    assert model.model.layers[0].self_attn.o_proj.active_adapter is None
    set_adapter(model, "b")
    assert_close(logits(model), out_b)

    with pytest.raises(ValueError, match="unknown adapter 'c'"):
        set_adapter(model, "c")
    with pytest.raises(ValueError, match="adapter 'a' already exists"):
        apply_adapter(model, AdapterConfig(), "a")


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("raw, key", [
    ({"variant": "housby"}, r"method\.variant: 'housby' is not one of \['houlsby', 'pfeiffer'\] "
                            r"\(did you mean 'houlsby'\?\)"),
    ({"non_linearity": "swish"}, r"method\.non_linearity: 'swish'"),
    ({"init": "zeros"}, r"method\.init: 'zeros'"),
    ({"reduction_factor": 0}, r"method\.reduction_factor must be an integer >= 1"),
    ({"layers_to_transform": [-1]}, r"method\.layers_to_transform"),
])
def test_bad_config_names_the_key(raw, key):
    with pytest.raises(ConfigError, match=key):
        from_dict({"model": "x", "method": {"name": "adapter", **raw}})
    with pytest.raises(ConfigError, match=key):
        apply_adapter(tiny_llama(), AdapterConfig(**raw))


def test_unsupported_models_are_clear_errors():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])

    with pytest.raises(ValueError, match=r"Toy's blocks \(Block\) have no known attention/FFN output"):
        apply_adapter(Toy(), AdapterConfig())
    with pytest.raises(ValueError, match="Linear has no transformer blocks"):
        apply_adapter(nn.Linear(4, 4), AdapterConfig())
    with pytest.raises(ValueError, match="reduction_factor=64 leaves no bottleneck for hidden size 32"):
        apply_adapter(tiny_llama(), AdapterConfig(reduction_factor=64))


# ----------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("variant", ["houlsby", "pfeiffer"])
def test_save_load_into_a_fresh_base_gives_identical_logits(arch, variant, tmp_path):
    model = MODELS[arch]()
    cfg = AdapterConfig(variant=variant, reduction_factor=4, non_linearity="gelu", init="random")
    apply_adapter(model, cfg, "mine")
    expected = logits(model)
    save_adapter(model, tmp_path, "mine", base_model_name_or_path="tiny", task_type="CAUSAL_LM")

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PEFTLAB_ADAPTER" and config["variant"] == variant
    assert config["target_modules"] == sorted(wrapped(arch, variant))
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys == {f"base_model.model.{m}.{k}" for m in wrapped(arch, variant) for k in KINDS}

    fresh = MODELS[arch]()
    method = method_for_adapter_dir(tmp_path)
    assert method.name == "adapter"
    assert method.load(fresh, tmp_path) == cfg
    assert adapter_names(fresh) == ["default"]
    assert_close(logits(fresh), expected)
    assert trainable(fresh) == adapter_params(wrapped(arch, variant))


def test_load_errors_name_the_file_and_key(tmp_path):
    model = tiny_llama()
    apply_adapter(model, AdapterConfig(variant="houlsby", reduction_factor=4))
    save_adapter(model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    key = "base_model.model.model.layers.1.self_attn.o_proj.adapter_up.bias"

    tensors = load_file(str(path))
    tensors[key] = torch.zeros(5)
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=rf"adapter_model\.safetensors: key '{key}' has shape \(5,\)"):
        load_adapter(tiny_llama(), tmp_path)
    fresh = tiny_llama()
    with pytest.raises(ValueError):
        load_adapter(fresh, tmp_path)
    assert not adapter_layers(fresh)  # checked before touching the model

    del tensors[key]
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=rf"missing key '{key}'"):
        load_adapter(tiny_llama(), tmp_path)

    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "variant": "parallel"}))
    with pytest.raises(ConfigError, match=r"adapter_config\.json\.variant: 'parallel'"):
        load_adapter(tiny_llama(), tmp_path)


def test_pfeiffer_file_does_not_load_as_houlsby(tmp_path):
    model = tiny_llama()
    apply_adapter(model, AdapterConfig(variant="pfeiffer"))
    save_adapter(model, tmp_path)
    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "variant": "houlsby"}))
    with pytest.raises(ValueError, match=r"missing key 'base_model\.model\.model\.layers\.0\.self_attn"):
        load_adapter(tiny_llama(), tmp_path)


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("variant", ["houlsby", "pfeiffer"])
def test_a_few_adamw_steps_reduce_the_loss(arch, variant):
    model = MODELS[arch]()
    get_method("adapter").apply(model, AdapterConfig(variant=variant, reduction_factor=4), "default")
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = train_steps(model, steps=10, lr=5e-2)
    # A tiny random model on random tokens plateaus fast; any real decrease proves training.
    assert losses[-1] < 0.985 * losses[0], losses
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), f"frozen {n} changed"
    with disable_adapters(model):
        assert_close(logits(model), logits(MODELS[arch]()))


def test_bf16_base_keeps_fp32_adapters_and_trains():
    model = tiny_bert()
    apply_adapter(model, AdapterConfig(variant="houlsby", reduction_factor=4))
    prepare_precision(model, "bf16")
    assert model.bert.encoder.layer[0].output.dense.base_layer.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=IDS, labels=torch.tensor([0, 1]))
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
