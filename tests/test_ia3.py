"""(IA)^3: the maths by hand, merge/disable, and numerical parity with peft in both directions.

peft is a test-only dependency: it is the reference our (IA)^3 must match exactly.
"""

from __future__ import annotations

import copy
import json
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
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
from peftlab.methods import get_method, method_for_adapter_dir
from peftlab.methods.ia3 import (
    IA3Config,
    IA3Linear,
    apply_ia3,
    disable_adapters,
    ia3_layers,
    load_ia3,
    merge,
    merge_and_unload,
    save_ia3,
    set_adapter,
    unmerge,
)
from peftlab.runtime.precision import prepare_precision
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
# Default targets per architecture (suffix after the block index) and which scale the input.
EXPECTED = {
    "llama": {"self_attn.k_proj": False, "self_attn.v_proj": False, "mlp.down_proj": True},
    "gpt2": {"attn.c_attn": False, "mlp.c_proj": True},
    # peft's "output.dense" also matches the attention output projection; we match peft.
    "bert": {"attention.self.key": False, "attention.self.value": False,
             "attention.output.dense": True, "output.dense": True},
}


def base_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = MODELS[arch]().eval()
    if arch == "bert":  # std-0.02 init gives ~0.01 logits; make differences visible
        with torch.no_grad():
            model.classifier.weight.mul_(50)
    return model


def batch_ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch_ids()).logits


def randomize(model: torch.nn.Module, seed: int = 3) -> None:
    """Non-trivial vectors around 1 so outputs move but stay well conditioned."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in ia3_layers(model).values():
            for p in layer.ia3_l.values():
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))


def peft_ia3(base: torch.nn.Module, **kwargs) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(base, peft.IA3Config(**kwargs)).eval()


# ----------------------------------------------------------------------------- maths


@pytest.mark.parametrize("arch", list(MODELS))
def test_default_targets_and_identity_at_init(arch):
    base = base_model(arch)
    expected = logits(base)
    apply_ia3(base, IA3Config())
    layers = ia3_layers(base)
    # The name inside the block: "model.layers.0.mlp.down_proj" -> "mlp.down_proj".
    found = {re.sub(r"^.*?\.(?:layers|h|layer)\.\d+\.", "", name): layer.is_feedforward
             for name, layer in layers.items()}
    assert found == EXPECTED[arch]
    assert len(layers) == 2 * len(EXPECTED[arch])  # every block
    assert all(bool((p == 1).all()) for layer in layers.values() for p in layer.ia3_l.values())
    assert_close(logits(base), expected, rtol=0, atol=0)


def test_forward_is_the_rescaling_by_hand():
    model = base_model("llama")
    apply_ia3(model, IA3Config())
    randomize(model)
    x = torch.randn(3, 32)
    k = model.model.layers[0].self_attn.k_proj
    assert k.ia3_l["default"].shape == (16, 1)  # (out, 1): 2 kv heads x head_dim 8
    assert_close(k(x), F.linear(x, k.weight) * k.ia3_l["default"].flatten())
    down = model.model.layers[0].mlp.down_proj
    h = torch.randn(3, 64)
    assert down.ia3_l["default"].shape == (1, 64)  # (1, in)
    assert_close(down(h), F.linear(h * down.ia3_l["default"].flatten(), down.weight))


def test_gpt2_conv1d_scales_output_columns_and_bias():
    model = base_model("gpt2")
    apply_ia3(model, IA3Config())
    randomize(model)
    attn = model.transformer.h[0].attn.c_attn  # Conv1D: weight (in, out), bias (out,)
    x = torch.randn(2, 32)
    scale = attn.ia3_l["default"].flatten()
    assert_close(attn(x), (x @ attn.weight + attn.bias) * scale)


@pytest.mark.parametrize("arch", list(MODELS))
def test_merge_unmerge_and_disable(arch):
    model = base_model(arch)
    base_logits = logits(model)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    apply_ia3(model, IA3Config())
    randomize(model)
    adapted = logits(model)
    assert not torch.allclose(adapted, base_logits, atol=1e-3)

    merge(model)
    assert_close(logits(model), adapted, atol=1e-5, rtol=1e-5)
    with disable_adapters(model):  # unmerges for the block, merges back after
        assert_close(logits(model), base_logits, atol=1e-5, rtol=1e-5)
    assert all(layer.merged_adapter == "default" for layer in ia3_layers(model).values())
    assert_close(logits(model), adapted, atol=1e-5, rtol=1e-5)

    unmerge(model)
    restored = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()
                if ".ia3_l." not in k}
    assert restored.keys() == original.keys()
    for k, v in original.items():
        assert_close(restored[k], v, atol=1e-6, rtol=1e-6, msg=k)
    with disable_adapters(model):
        assert_close(logits(model), base_logits)
    assert_close(logits(model), adapted)

    plain = merge_and_unload(model)
    assert not ia3_layers(plain)
    assert_close(logits(plain), adapted, atol=1e-5, rtol=1e-5)


def test_only_ia3_trainable_and_loss_falls():
    model = base_model("llama").train()
    apply_ia3(model, IA3Config())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".ia3_l.default") for n in trainable)
    assert len(trainable) == 6
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.2)
    ids = batch_ids()
    losses = []
    for _ in range(10):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    # A random tiny Llama sits near the uniform loss ln(128); rescaling moves it slowly but surely.
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < losses[0] - 0.03, losses


def test_bf16_base_under_autocast():
    model = base_model("llama")
    base = logits(model)
    apply_ia3(model, IA3Config())
    randomize(model)
    expected = logits(model)
    # The tolerance comes from what IA3 does here (logits move by up to ~0.19); bf16 moves
    # them by ~0.002. Dropping the vectors on the bf16 path (or in the bf16 merge) would be
    # off by the whole effect; a tenth of it is allowed.
    tol = 0.1 * (expected - base).abs().max()
    prepare_precision(model, "bf16")  # frozen weights to bf16, ia3 vectors stay fp32
    layer = model.model.layers[0].mlp.down_proj
    assert layer.weight.dtype == torch.bfloat16 and layer.ia3_l["default"].dtype == torch.float32
    ids = batch_ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert (out.logits.float() - expected).abs().max() < tol
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        unmerged = model(input_ids=ids).logits.float()
        merge(model)
        merged = model(input_ids=ids).logits.float()
    assert layer.weight.dtype == torch.bfloat16
    assert (merged - expected).abs().max() < tol and (unmerged - expected).abs().max() < tol


# ----------------------------------------------------------------------------- peft parity


@pytest.mark.parametrize("arch", list(MODELS))
def test_ours_to_peft(arch, tmp_path):
    base = base_model(arch)
    fresh = copy.deepcopy(base)
    apply_ia3(base, IA3Config())
    randomize(base)
    ours = logits(base)
    save_ia3(base, tmp_path)  # task_type inferred; a SEQ_CLS file also carries the head
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["task_type"] == ("SEQ_CLS" if arch == "bert" else "CAUSAL_LM")
    assert config["modules_to_save"] == (["classifier"] if arch == "bert" else None)
    theirs = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    assert_close(logits(theirs), ours)


@pytest.mark.parametrize("arch", list(MODELS))
def test_peft_to_ours(arch, tmp_path):
    base = base_model(arch)
    fresh = copy.deepcopy(base)
    theirs = peft_ia3(base, init_ia3_weights=False)  # N(0, 1) vectors: far from identity
    expected = logits(theirs)
    theirs.save_pretrained(tmp_path)

    cfg = load_ia3(fresh, tmp_path)
    assert cfg.init_ia3_weights is False
    assert_close(logits(fresh), expected)
    ours_sd = {k: v for k, v in fresh.state_dict().items() if ".ia3_l." in k}
    theirs_sd = {k.removeprefix("base_model.model."): v for k, v in theirs.state_dict().items()
                 if ".ia3_l." in k}
    assert ours_sd.keys() == theirs_sd.keys()
    assert all(torch.equal(v, theirs_sd[k]) for k, v in ours_sd.items())


def test_train_step_matches_peft():
    """Same vectors -> same loss and gradients (pins down where each vector acts)."""
    base = base_model("llama")
    ours = copy.deepcopy(base)
    theirs = peft_ia3(base, init_ia3_weights=False).train()
    apply_ia3(ours, IA3Config())
    ours.train().load_state_dict({k.removeprefix("base_model.model."): v
                                  for k, v in theirs.state_dict().items()})
    ids = batch_ids()
    losses, grads = [], []
    for model in (ours, theirs):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss)
        grads.append({n.removeprefix("base_model.model."): p.grad
                      for n, p in model.named_parameters() if p.requires_grad})
    assert_close(losses[0], losses[1])
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        assert_close(g, grads[1][n], atol=1e-6, rtol=1e-5, msg=n)


def test_file_keys_and_config_match_peft(tmp_path):
    base = base_model("gpt2")
    ours = copy.deepcopy(base)
    theirs = peft_ia3(base, init_ia3_weights=False)
    theirs.save_pretrained(tmp_path / "peft")
    load_ia3(ours, tmp_path / "peft")
    save_ia3(ours, tmp_path / "ours")
    peft_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    our_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert our_file.keys() == peft_file.keys()
    assert all(torch.equal(our_file[k], peft_file[k]) for k in our_file)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["fan_in_fan_out"] is True
    assert config["feedforward_modules"] == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]
    assert config["init_ia3_weights"] is False and config["task_type"] == "CAUSAL_LM"


def test_classifier_modules_to_save_roundtrip(tmp_path):
    """peft's SEQ_CLS adapters also carry the trained classifier head (modules_to_save)."""
    base = base_model("bert")
    fresh, fresh2 = copy.deepcopy(base), copy.deepcopy(base)
    theirs = peft_ia3(base, task_type="SEQ_CLS", init_ia3_weights=False)
    with torch.no_grad():
        theirs.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
    theirs.save_pretrained(tmp_path / "peft")
    expected = logits(theirs)

    cfg = load_ia3(fresh, tmp_path / "peft")
    assert cfg.modules_to_save == ["classifier", "score"]
    assert_close(logits(fresh), expected)
    assert fresh.classifier.weight.requires_grad

    save_ia3(fresh, tmp_path / "ours", task_type="SEQ_CLS")
    again = peft.PeftModel.from_pretrained(fresh2, tmp_path / "ours").eval()
    assert_close(logits(again), expected)


def test_registry_roundtrip_with_explicit_targets(tmp_path):
    method = get_method("ia3")
    model = base_model("llama")
    fresh = copy.deepcopy(model)
    method.apply(model, IA3Config(target_modules=["v_proj", "up_proj"],
                                  feedforward_modules=["up_proj"]), "default")
    randomize(model)
    method.save(model, tmp_path)
    assert method_for_adapter_dir(tmp_path) is method
    cfg = method.load(fresh, tmp_path, "mine")
    assert cfg.feedforward_modules == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    assert sorted(ia3_layers(fresh)) == sorted(ia3_layers(model))
    assert all(isinstance(m, IA3Linear) and m.active_adapter == "mine"
               for m in ia3_layers(fresh).values())
    assert_close(logits(fresh), logits(model))


def test_two_adapters_switch():
    model = base_model("llama")
    apply_ia3(model, IA3Config())
    randomize(model, seed=1)
    first = logits(model)
    apply_ia3(model, IA3Config(init_ia3_weights=False), "second")
    assert not torch.allclose(logits(model), first, atol=1e-3)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".ia3_l.second") for n in trainable)
    set_adapter(model, "default")
    assert_close(logits(model), first)


# ----------------------------------------------------------------------------- errors


def test_config_errors():
    with pytest.raises(ValueError, match="no default target_modules"):
        model = base_model("llama")
        model.config.model_type = "mystery"
        apply_ia3(model, IA3Config())
    with pytest.raises(ValueError, match="feedforward_modules entry 'down'"):
        apply_ia3(base_model("llama"), IA3Config(target_modules=["k_proj"], feedforward_modules=["down"]))
    with pytest.raises(ConfigError, match="method.target_modules"):
        apply_ia3(base_model("llama"), IA3Config(target_modules=[]))


@pytest.fixture
def saved(tmp_path):
    model = base_model("llama")
    apply_ia3(model, IA3Config())
    save_ia3(model, tmp_path)
    return tmp_path


def _edit_weights(directory, edit):
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_wrong_side_shape_names_key(saved):
    key = "base_model.model.model.layers.0.mlp.down_proj.ia3_l"
    _edit_weights(saved, lambda t: t.update({key: torch.ones(32, 1)}))
    with pytest.raises(ValueError, match="shape") as err:
        load_ia3(base_model("llama"), saved)
    assert key in str(err.value) and "adapter_model.safetensors" in str(err.value)


@pytest.mark.parametrize("key", [
    "base_model.model.model.layers.9.self_attn.k_proj.ia3_l",
    "base_model.model.model.norm.ia3_l",
    "base_model.model.lm_head.weight",
])
def test_unexpected_key_names_file_and_key(saved, key):
    _edit_weights(saved, lambda t: t.update({key: torch.ones(16, 1)}))
    with pytest.raises(ValueError, match="unexpected key") as err:
        load_ia3(base_model("llama"), saved)
    assert key in str(err.value) and "adapter_model.safetensors" in str(err.value)


def test_wrong_peft_type_names_file(saved):
    path = saved / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "peft_type": "LORA"}))
    with pytest.raises(ConfigError, match="adapter_config.json.*peft_type"):
        load_ia3(base_model("llama"), saved)
