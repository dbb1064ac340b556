"""full, freeze and feature_extraction: exactly which parameters train, save/load, training."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
)

from peftlab.config import ConfigError, from_dict
from peftlab.methods import get_method, method_for_adapter_dir
from peftlab.methods.freeze import (
    FeatureExtractionConfig,
    FreezeConfig,
    apply_feature_extraction,
    apply_freeze,
    load_freeze,
    save_freeze,
)
from peftlab.methods.full import FullConfig, apply_full, load_full, save_full
from peftlab.methods.lora import count_parameters


def llama_config(layers: int = 2, tied: bool = False) -> LlamaConfig:
    return LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)


def tiny_llama(seed: int = 0, layers: int = 2, tied: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(layers, tied)).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, bos_token_id=0, eos_token_id=0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def bert_config() -> BertConfig:
    return BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, num_labels=3, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(bert_config()).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
LABELS = torch.tensor([0, 2])

LLAMA_BLOCK = ["input_layernorm.weight", "post_attention_layernorm.weight",
               "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
               "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
               "mlp.down_proj.weight"]
GPT2_BLOCK = [f"{m}.{w}" for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
              for w in ("weight", "bias")]
BERT_BLOCK = [f"{m}.{w}" for m in ("attention.self.query", "attention.self.key", "attention.self.value",
                                   "attention.output.dense", "attention.output.LayerNorm",
                                   "intermediate.dense", "output.dense", "output.LayerNorm")
              for w in ("weight", "bias")]
# freeze(trainable_layers=1) = the last block + the head. GPT-2's lm_head is tied to wte.
FREEZE_TOP1 = {
    "llama": {f"model.layers.1.{n}" for n in LLAMA_BLOCK} | {"lm_head.weight"},
    "gpt2": {f"transformer.h.1.{n}" for n in GPT2_BLOCK} | {"transformer.wte.weight"},
    "bert": {f"bert.encoder.layer.1.{n}" for n in BERT_BLOCK} | {"classifier.weight", "classifier.bias"},
}
PROBE = {"llama": {"lm_head.weight"}, "gpt2": {"transformer.wte.weight"},
         "bert": {"classifier.weight", "classifier.bias"}}


def trainable(model: torch.nn.Module) -> set[str]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return names


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def loss(model: torch.nn.Module) -> torch.Tensor:
    if isinstance(model, BertForSequenceClassification):
        return model(input_ids=IDS, labels=LABELS).loss
    return model(input_ids=IDS, labels=IDS).loss


def train_steps(model: torch.nn.Module, steps: int = 8, lr: float = 1e-2) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        value = loss(model)
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(value.item())
    with torch.no_grad():
        losses.append(loss(model).item())
    return losses


# ----------------------------------------------------------------------------- registry


def test_methods_are_registered_with_their_peft_types():
    assert get_method("full").peft_type == "PEFTLAB_FULL"
    assert get_method("freeze").peft_type == "PEFTLAB_FREEZE"
    assert get_method("feature_extraction").peft_type is None  # saves as PEFTLAB_FREEZE
    cfg = from_dict({"model": "x", "method": {"name": "freeze", "trainable_layers": 1,
                                               "trainable_modules": ["norm"]}})
    assert cfg.method == FreezeConfig(trainable_layers=1, trainable_modules=["norm"])
    assert from_dict({"model": "x", "method": "feature_extraction"}).method == FeatureExtractionConfig()
    assert from_dict({"model": "x", "method": {"name": "full", "exclude": ["embed_tokens"]}}
                     ).method == FullConfig(exclude=["embed_tokens"])


@pytest.mark.parametrize("raw, key", [
    ({"name": "freeze", "trainable_layers": -1}, "method.trainable_layers"),
    ({"name": "freeze", "trainable_modules": "("}, "method.trainable_modules"),
    ({"name": "freeze", "trainable_modules": []}, "method.trainable_modules"),
    ({"name": "feature_extraction", "train_head": False}, "train_head"),
    ({"name": "full", "exclude": [""]}, "method.exclude"),
])
def test_bad_config_names_the_key(raw, key):
    with pytest.raises(ConfigError, match=key):
        from_dict({"model": "x", "method": raw})


# ----------------------------------------------------------------------------- full


@pytest.mark.parametrize("arch", list(MODELS))
def test_full_trains_every_parameter(arch):
    model = MODELS[arch]()
    for p in model.parameters():
        p.requires_grad_(False)
    apply_full(model, FullConfig())
    assert trainable(model) == {n for n, _ in model.named_parameters()}
    n_train, n_total = count_parameters(model)
    assert n_train == n_total > 0


def test_full_exclude_freezes_the_named_modules_and_their_tied_twins():
    model = tiny_llama()
    apply_full(model, FullConfig(exclude=["embed_tokens", "model.norm"]))
    everything = {n for n, _ in model.named_parameters()}
    assert trainable(model) == everything - {"model.embed_tokens.weight", "model.norm.weight"}

    tied = tiny_llama(tied=True)
    apply_full(tied, FullConfig(exclude=["lm_head"]))  # lm_head.weight IS embed_tokens.weight
    assert not tied.lm_head.weight.requires_grad and not tied.model.embed_tokens.weight.requires_grad
    assert "model.layers.0.mlp.up_proj.weight" in trainable(tied)

    with pytest.raises(ValueError, match="method.exclude: 'embed_token' matches no module"):
        apply_full(tiny_llama(), FullConfig(exclude=["embed_token"]))


@pytest.mark.parametrize("arch", list(MODELS))
def test_full_save_load_into_a_different_base_gives_identical_logits(arch, tmp_path):
    model = MODELS[arch](seed=0)
    apply_full(model, FullConfig())
    train_steps(model, steps=2)
    expected = logits(model)
    save_full(model, tmp_path, task_type="SEQ_CLS" if arch == "bert" else "CAUSAL_LM")

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PEFTLAB_FULL" and config["method"] == "full"
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert method_for_adapter_dir(tmp_path).name == "full"

    fresh = MODELS[arch](seed=123)  # other random weights: everything must come from the file
    assert not torch.allclose(logits(fresh), expected)
    method_for_adapter_dir(tmp_path).load(fresh, tmp_path)
    assert_close(logits(fresh), expected)
    assert trainable(fresh) == {n for n, _ in fresh.named_parameters()}

    # model/ is a plain transformers directory (even with peft installed: no adapter_config.json)
    plain = type(model).from_pretrained(tmp_path / "model").eval()
    assert_close(logits(plain), expected)


def test_full_load_refuses_a_mismatched_model(tmp_path):
    model = tiny_llama()
    apply_full(model, FullConfig())
    save_full(model, tmp_path)
    with pytest.raises(ValueError, match=r"model\.safetensors: unexpected key 'model\."):
        load_full(tiny_gpt2(), tmp_path)
    with pytest.raises(ValueError, match=r"missing key 'model\.layers\.2\."):
        load_full(tiny_llama(layers=3), tmp_path)


def test_full_load_accepts_tied_weights_saved_once(tmp_path):
    model = tiny_llama(tied=True)
    apply_full(model, FullConfig())
    train_steps(model, steps=2)
    save_full(model, tmp_path)
    keys = set(load_file(str(tmp_path / "model" / "model.safetensors")))
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    fresh = tiny_llama(seed=5, tied=True)
    load_full(fresh, tmp_path)
    assert_close(logits(fresh), logits(model))
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight


# ----------------------------------------------------------------------------- freeze


@pytest.mark.parametrize("arch", list(MODELS))
def test_freeze_trains_exactly_the_top_block_and_the_head(arch):
    model = MODELS[arch]()
    apply_freeze(model, FreezeConfig(trainable_layers=1))
    assert trainable(model) == FREEZE_TOP1[arch]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(not p.requires_grad for p in frozen)


def test_freeze_trainable_modules_by_suffix_and_regex():
    model = tiny_llama(layers=3)
    apply_freeze(model, FreezeConfig(trainable_layers=2, train_head=False, trainable_modules=["norm"]))
    expected = {f"model.layers.{i}.{n}" for i in (1, 2) for n in LLAMA_BLOCK} | {"model.norm.weight"}
    assert trainable(model) == expected

    apply_freeze(model, FreezeConfig(trainable_layers=0, train_head=False,
                                     trainable_modules=r"model\.layers\.0\.mlp\.(up|down)_proj"))
    assert trainable(model) == {"model.layers.0.mlp.up_proj.weight",
                                "model.layers.0.mlp.down_proj.weight"}


def test_freeze_tied_head_trains_the_shared_embedding_matrix():
    model = tiny_llama(tied=True)
    apply_freeze(model, FreezeConfig(trainable_layers=0, trainable_modules=None, train_head=True))
    assert trainable(model) == {"model.embed_tokens.weight"}
    assert model.lm_head.weight.requires_grad


@pytest.mark.parametrize("cfg, match", [
    (FreezeConfig(trainable_layers=3), "trainable_layers=3 exceeds the 2 transformer blocks"),
    (FreezeConfig(trainable_modules=["nrom"]), "method.trainable_modules: 'nrom' matches no module"),
    (FreezeConfig(trainable_layers=0, train_head=False), "nothing to train"),
])
def test_freeze_errors_are_clear(cfg, match):
    model = tiny_llama()
    before = trainable(model)
    with pytest.raises(ValueError, match=match):
        apply_freeze(model, cfg)
    assert trainable(model) == before  # nothing was frozen on the way


def test_freeze_needs_a_head_when_train_head_is_set():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="LlamaModel has no task head.*train_head=false"):
        apply_freeze(LlamaModel(llama_config()), FreezeConfig(trainable_layers=1))
    bare = LlamaModel(llama_config())
    apply_freeze(bare, FreezeConfig(trainable_layers=1, train_head=False))
    assert trainable(bare) == {f"layers.1.{n}" for n in LLAMA_BLOCK}


@pytest.mark.parametrize("arch", list(MODELS))
def test_freeze_save_load_into_a_fresh_base_gives_identical_logits(arch, tmp_path):
    model = MODELS[arch]()
    apply_freeze(model, FreezeConfig(trainable_layers=1))
    train_steps(model, steps=2)
    expected = logits(model)
    save_freeze(model, tmp_path)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PEFTLAB_FREEZE" and config["method"] == "freeze"
    assert config["trainable_layers"] == 1 and config["train_head"] is True
    assert set(load_file(str(tmp_path / "adapter_model.safetensors"))) == FREEZE_TOP1[arch]

    fresh = MODELS[arch]()
    assert not torch.allclose(logits(fresh), expected)
    cfg = method_for_adapter_dir(tmp_path).load(fresh, tmp_path)
    assert cfg == FreezeConfig(trainable_layers=1)
    assert_close(logits(fresh), expected)
    assert trainable(fresh) == FREEZE_TOP1[arch]


def test_freeze_load_errors_name_the_key(tmp_path):
    model = tiny_llama()
    apply_freeze(model, FreezeConfig(trainable_layers=1, train_head=False))
    save_freeze(model, tmp_path)
    # A 3-block base: the top block is now layers.2, so the file's layers.1 keys do not fit.
    with pytest.raises(ValueError, match=r"unexpected key 'model\.layers\.1\."):
        load_freeze(tiny_llama(layers=3), tmp_path)

    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=r"missing key 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_freeze(tiny_llama(), tmp_path)

    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "trainable_layers": -2}))
    with pytest.raises(ConfigError, match=r"adapter_config\.json\.trainable_layers"):
        load_freeze(tiny_llama(), tmp_path)


# ----------------------------------------------------------------------------- feature extraction


@pytest.mark.parametrize("arch", list(MODELS))
def test_feature_extraction_trains_only_the_head(arch):
    model = MODELS[arch]()
    apply_feature_extraction(model, FeatureExtractionConfig())
    assert trainable(model) == PROBE[arch]  # BERT: classifier only, the pooler stays frozen


@pytest.mark.parametrize("bare", [lambda: LlamaModel(llama_config()), lambda: BertModel(bert_config())])
def test_feature_extraction_without_a_head_is_a_clear_error(bare):
    model = bare()
    with pytest.raises(ValueError, match=r"feature_extraction: \w+Model has no task head"):
        get_method("feature_extraction").apply(model, FeatureExtractionConfig(), "default")


def test_feature_extraction_saves_as_freeze_and_loads_back(tmp_path):
    model = tiny_bert()
    apply_feature_extraction(model)
    train_steps(model, steps=3)
    save_freeze(model, tmp_path, task_type="SEQ_CLS")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PEFTLAB_FREEZE" and config["method"] == "feature_extraction"
    assert set(load_file(str(tmp_path / "adapter_model.safetensors"))) == PROBE["bert"]
    fresh = tiny_bert()
    method = method_for_adapter_dir(tmp_path)
    assert method.name == "freeze"
    method.load(fresh, tmp_path)
    assert_close(logits(fresh), logits(model))
    assert trainable(fresh) == PROBE["bert"]


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("method", ["full", "freeze", "feature_extraction"])
def test_a_few_adamw_steps_reduce_the_loss(arch, method):
    model = MODELS[arch]()
    spec = get_method(method)
    cfg = spec.config_cls(trainable_layers=1) if method == "freeze" else spec.config_cls()
    spec.apply(model, cfg, "default")
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = train_steps(model)
    assert losses[-1] < 0.9 * losses[0], losses
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), f"frozen {n} changed"
