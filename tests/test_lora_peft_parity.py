"""Numerical parity with the peft library, in both directions, and the on-disk format.

peft is a test-only dependency: it is the reference our LoRA must match exactly.
"""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from peftlab.config import ConfigError
from peftlab.methods import get_method
from peftlab.methods.lora import LoraConfig, apply_lora, load_lora, lora_layers, save_lora
from tests.deps import import_test_dep

peft = import_test_dep("peft")
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]


def tiny_llama() -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg)


def tiny_gpt2() -> GPT2LMHeadModel:
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def tiny_bert() -> BertForSequenceClassification:
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, num_labels=3)
    return BertForSequenceClassification(cfg)


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}
TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": None}
VARIANTS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}


def base_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODELS[arch]().eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


def peft_model(base: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """A peft LoRA model with random (non-zero) B, so the adapter actually changes outputs."""
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                          **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(base, cfg).eval()


def perturb_magnitudes(model: torch.nn.Module, seed: int = 4) -> None:
    """Scale every DoRA magnitude (ours or peft's) by a factor in [0.5, 1.5).

    Both start m at ||W + sBA||, where DoRA's output equals LoRA's: parity there cannot
    tell DoRA from LoRA. The factors follow the parameters' order, the same in both."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(0.5 + torch.rand(p.shape, generator=g))


def _peft_to_our_name(name: str) -> str:
    """peft keeps DoRA's magnitude one module deeper (lora_magnitude_vector.<name>.weight)."""
    name = name.removeprefix("base_model.model.")
    return name.replace("lora_magnitude_vector.default.weight", "lora_magnitude_vector.default")


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ours_to_peft(arch, variant, tmp_path):
    base = base_model(arch)
    fresh = copy.deepcopy(base)
    apply_lora(base, LoraConfig(r=4, alpha=8, init="random", **VARIANTS[variant]))
    perturb_magnitudes(base)
    ours = logits(base)
    assert not torch.allclose(ours, logits(fresh), atol=1e-3)  # the adapter does something

    save_lora(base, tmp_path, base_model_name_or_path="tiny", task_type=TASK[arch])
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    theirs = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    assert_close(logits(theirs), ours)


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_to_ours(arch, variant, tmp_path):
    base = base_model(arch)
    fresh = copy.deepcopy(base)
    theirs = peft_model(base, **VARIANTS[variant])
    perturb_magnitudes(theirs)
    expected = logits(theirs)
    theirs.save_pretrained(tmp_path)

    cfg = load_lora(fresh, tmp_path)
    assert (cfg.r, cfg.alpha, cfg.init) == (4, 8.0, "random")
    assert (cfg.use_rslora, cfg.use_dora) == ("use_rslora" in VARIANTS[variant],
                                              "use_dora" in VARIANTS[variant])
    assert_close(logits(fresh), expected)
    # The same tensors sit under the same in-memory names (peft stores DoRA's m one level deeper).
    ours_sd = {k: v for k, v in fresh.state_dict().items() if ".lora_" in k}
    theirs_sd = {_peft_to_our_name(k): v for k, v in theirs.state_dict().items() if ".lora_" in k}
    assert ours_sd.keys() == theirs_sd.keys()
    for k, v in ours_sd.items():
        assert torch.equal(v, theirs_sd[k]), k


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_train_mode_outputs_and_gradients_match_peft(variant):
    """Same weights, same dropout masks -> same loss and gradients. This pins down dropout
    placement (DoRA recomputes W x on the dropped-out input) and DoRA's detached weight norm."""
    base = base_model("llama")
    ours = copy.deepcopy(base)
    theirs = peft_model(base, lora_dropout=0.3, **VARIANTS[variant]).train()
    perturb_magnitudes(theirs)  # copied into ours below
    apply_lora(ours, LoraConfig(r=4, alpha=8, dropout=0.3, **VARIANTS[variant]))
    ours.train().load_state_dict({_peft_to_our_name(k): v for k, v in theirs.state_dict().items()})
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    losses = []
    for model in (ours, theirs):
        torch.manual_seed(5)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss)
    assert_close(losses[0], losses[1])
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    theirs_grads = {_peft_to_our_name(n): p.grad for n, p in theirs.named_parameters()
                    if p.requires_grad}
    assert grads.keys() == theirs_grads.keys()
    for n, g in grads.items():
        assert_close(g, theirs_grads[n], atol=1e-6, rtol=1e-5, msg=n)


def test_file_keys_match_peft(tmp_path):
    """Saving the same adapter with peft and with us gives the same tensor names."""
    base = base_model("gpt2")
    ours = copy.deepcopy(base)
    theirs = peft_model(base, use_dora=True)
    perturb_magnitudes(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    load_lora(ours, tmp_path / "peft")
    save_lora(ours, tmp_path / "ours")
    peft_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    our_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert our_file.keys() == peft_file.keys()
    assert all(torch.equal(our_file[k], peft_file[k]) for k in our_file)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] is True
    assert config["use_dora"] is True and config["init_lora_weights"] is False
    assert not [f for f in os.listdir(tmp_path / "ours") if f.startswith(".")]  # no temp files


def test_classifier_modules_to_save_roundtrip(tmp_path):
    """peft's SEQ_CLS adapters also carry the trained classifier head (modules_to_save)."""
    base = base_model("bert")
    fresh, fresh2 = copy.deepcopy(base), copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(base, peft.LoraConfig(
            r=4, target_modules=["query", "value"], task_type="SEQ_CLS", init_lora_weights=False))
    with torch.no_grad():
        theirs.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
    theirs.eval().save_pretrained(tmp_path / "peft")
    expected = logits(theirs)

    cfg = load_lora(fresh, tmp_path / "peft")
    assert cfg.modules_to_save == ["classifier", "score"]
    assert_close(logits(fresh), expected)
    assert fresh.classifier.weight.requires_grad  # trained in full, as in peft

    save_lora(fresh, tmp_path / "ours", task_type="SEQ_CLS")
    again = peft.PeftModel.from_pretrained(fresh2, tmp_path / "ours").eval()
    assert_close(logits(again), expected)


def test_registry_save_load_roundtrip(tmp_path):
    method = get_method("lora")
    model = base_model("llama")
    fresh = copy.deepcopy(model)
    method.apply(model, LoraConfig(r=2, init="random", target_modules=["q_proj"],
                                   layers_to_transform=[1]), "default")
    method.save(model, tmp_path)
    cfg = method.load(fresh, tmp_path, "mine")
    assert cfg.layers_to_transform == [1]
    assert list(lora_layers(fresh)) == ["model.layers.1.self_attn.q_proj"]
    assert_close(logits(fresh), logits(model))


# ----------------------------------------------------------------------------- errors


@pytest.fixture
def saved(tmp_path):
    model = base_model("llama")
    apply_lora(model, LoraConfig(r=2, init="random", target_modules=["q_proj", "v_proj"]))
    save_lora(model, tmp_path)
    return tmp_path


def _edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("changes, key", [
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": 8}}, "alpha_pattern"),
    ({"peft_type": "IA3"}, "peft_type"),
    ({"r": 0}, "'r'"),
    ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights"),
    ({"init_lora_weights": "corda"}, "init_lora_weights"),
    ({"bias": "all"}, "bias"),
])
def test_bad_config_key_names_file_and_key(saved, changes, key):
    _edit_config(saved, **changes)
    with pytest.raises(ConfigError) as err:
        load_lora(base_model("llama"), saved)
    assert "adapter_config.json" in str(err.value) and key in str(err.value)


def test_unknown_config_keys_are_ignored(saved):
    saved_model = base_model("llama")
    load_lora(saved_model, saved)
    expected = logits(saved_model)
    _edit_config(saved, some_future_peft_option={"x": 1}, exclude_modules=None)
    model = base_model("llama")
    cfg = load_lora(model, saved)
    assert (cfg.r, cfg.target_modules) == (2, ["model.layers.0.self_attn.q_proj",
                                               "model.layers.0.self_attn.v_proj",
                                               "model.layers.1.self_attn.q_proj",
                                               "model.layers.1.self_attn.v_proj"])
    assert_close(logits(model), expected)
    assert not torch.allclose(expected, logits(base_model("llama")), atol=1e-3)


def _edit_weights(directory, edit):
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_missing_tensor_key_names_file_and_key(saved):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    _edit_weights(saved, lambda t: t.pop(key))
    with pytest.raises(ValueError, match="missing key") as err:
        load_lora(base_model("llama"), saved)
    assert key in str(err.value) and "adapter_model.safetensors" in str(err.value)


def test_missing_module_listed_in_config_is_an_error(saved):
    prefix = "base_model.model.model.layers.1.self_attn.v_proj"
    _edit_weights(saved, lambda t: [t.pop(f"{prefix}.lora_A.weight"), t.pop(f"{prefix}.lora_B.weight")])
    with pytest.raises(ValueError, match=f"missing key '{prefix}.lora_A.weight'"):
        load_lora(base_model("llama"), saved)


@pytest.mark.parametrize("key", [
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.extra",
    "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight",
    "base_model.model.model.norm.lora_A.weight",
])
def test_unexpected_tensor_key_names_file_and_key(saved, key):
    _edit_weights(saved, lambda t: t.update({key: torch.zeros(2, 32)}))
    with pytest.raises(ValueError, match="unexpected key") as err:
        load_lora(base_model("llama"), saved)
    assert "adapter_model.safetensors" in str(err.value) and key in str(err.value)


def test_shape_mismatch_and_pickle_refused(saved):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _edit_weights(saved, lambda t: t.update({key: torch.zeros(3, 32)}))
    with pytest.raises(ValueError, match="shape"):
        load_lora(base_model("llama"), saved)
    os.replace(saved / "adapter_model.safetensors", saved / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="adapter_model.bin"):
        load_lora(base_model("llama"), saved)
