"""Prefix tuning: numerical parity with the peft library (forward, SFT loss, gradients,
greedy generation with KV cache, files in both directions), plus our own behaviour.

peft is a test-only dependency: the reference our hook-based prefix tuning must match.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.testing import assert_close
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from peftlab.config import ConfigError
from peftlab.data.collate import pad_collate
from peftlab.methods import get_method, method_for_adapter_dir
from peftlab.methods.prefix_tuning import (
    PrefixTuningConfig,
    adapter_names,
    apply_prefix_tuning,
    disable_adapters,
    load_prefix_tuning,
    prefix_encoder,
    remove_prefix_tuning,
    save_prefix_tuning,
    set_adapter,
)
from peftlab.models.kv_cache import cache_kwargs, output_cache
from peftlab.runtime.precision import prepare_precision
from peftlab.tasks.sft.task import SFTTask
from tests.deps import import_test_dep
from tests.peft_reference import peft_generate

peft = import_test_dep("peft")
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

NVT = 5
PAD = 0


def tiny_llama() -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD)
    return LlamaForCausalLM(cfg)


def tiny_gpt2() -> GPT2LMHeadModel:
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, bos_token_id=0,
                     eos_token_id=0, pad_token_id=PAD)
    return GPT2LMHeadModel(cfg)


def tiny_bert() -> BertForSequenceClassification:
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, num_labels=3)
    return BertForSequenceClassification(cfg)


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}
TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}
CAUSAL = ["llama", "gpt2"]


def base_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODELS[arch]().eval()


def peft_model(base: torch.nn.Module, arch: str, projection: bool) -> torch.nn.Module:
    """A peft prefix-tuning model (random prefix, peft's default init)."""
    torch.manual_seed(3)
    cfg = peft.PrefixTuningConfig(task_type=TASK[arch], num_virtual_tokens=NVT,
                                  prefix_projection=projection)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(base, cfg).eval()


def ours_like(model: torch.nn.Module, theirs: torch.nn.Module, projection: bool) -> None:
    """Apply our prefix tuning and copy peft's prompt encoder weights into it (same names)."""
    apply_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=NVT,
                                                  prefix_projection=projection))
    state = {k.removeprefix("prompt_encoder.default."): v for k, v in theirs.state_dict().items()
             if k.startswith("prompt_encoder.default.")}
    prefix_encoder(model).load_state_dict(state)  # strict: the parameter layouts are identical


def batch(left_pad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of 9 tokens; the first has 3 pad tokens (left or right)."""
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    pad = slice(0, 3) if left_pad else slice(6, 9)
    mask[0, pad] = 0
    ids[0, pad] = PAD
    return ids, mask


def logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(model, peft.PeftModel) and peft_refuses(model):
            return peft_steps(model, ids, mask)
        return model(input_ids=ids, attention_mask=mask).logits


def peft_refuses(theirs: torch.nn.Module) -> bool:
    """peft (0.21) runs a SEQ_CLS prefix only through a forward that declares
    ``past_key_values``; from transformers 5.24 on it is spelled ``cache`` and peft refuses."""
    params = inspect.signature(theirs.base_model.forward).parameters
    return theirs.peft_config["default"].task_type == "SEQ_CLS" and "past_key_values" not in params


def peft_steps(theirs: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> Tensor:
    """The logits of peft's SEQ_CLS prefix forward, step by step (its prompt as the backbone's
    cache, the mask widened by the virtual tokens, pooled output -> dropout -> classifier),
    for the transformers where peft itself refuses (see peft_refuses)."""
    n = theirs.peft_config["default"].num_virtual_tokens
    if mask is not None:
        mask = torch.cat([mask.new_ones(ids.shape[0], n), mask], dim=1)
    base = theirs.base_model
    backbone = base.get_submodule(theirs.transformer_backbone_name)
    out = backbone(input_ids=ids, attention_mask=mask,
                   **cache_kwargs(backbone, theirs.get_prompt(ids.shape[0])))
    return base.classifier(base.dropout(out.pooler_output))


# ----------------------------------------------------------------------------- peft parity


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("arch", list(MODELS))
def test_logits_match_peft(arch, projection):
    base = base_model(arch)
    ours = copy.deepcopy(base)
    plain = copy.deepcopy(base)
    theirs = peft_model(base, arch, projection)
    ours_like(ours, theirs, projection)
    ids, mask = batch(left_pad=arch != "bert")
    for m in (mask, None):
        expected = logits(theirs, ids, m)
        assert_close(logits(ours, ids, m), expected)
        assert not torch.allclose(expected, logits(plain, ids, m), atol=1e-3)  # prefix matters


def test_gqa_prefix_uses_key_value_heads():
    """Llama with 4 query / 2 KV heads: the prefix is sized for the KV heads, as in peft."""
    model = base_model("llama")
    apply_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=NVT))
    enc = prefix_encoder(model)
    assert (enc.shape.num_layers, enc.shape.num_heads, enc.shape.head_dim) == (2, 2, 8)
    assert enc.embedding.weight.shape == (NVT, 2 * 2 * 16)
    keys, values = enc.key_values(batch_size=3, dtype=torch.float32)[1]
    assert keys.shape == values.shape == (3, 2, NVT, 8)
    flat = enc.embedding.weight.view(NVT, 4, 2, 8)  # layer 1: key row 2, value row 3
    assert torch.equal(keys[0], flat[:, 2].transpose(0, 1))
    assert torch.equal(values[2], flat[:, 3].transpose(0, 1))


def test_padding_positions_are_consistent():
    """Independent of peft: a padded row equals the same tokens run alone. Llama with
    left padding and generate-style position ids; BERT with right padding."""
    llama = base_model("llama")
    apply_prefix_tuning(llama, PrefixTuningConfig(num_virtual_tokens=NVT))
    ids, mask = batch(left_pad=True)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        padded = llama(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        alone = llama(input_ids=ids[:1, 3:]).logits
    assert_close(padded[0, 3:], alone[0])

    bert = base_model("bert")
    apply_prefix_tuning(bert, PrefixTuningConfig(num_virtual_tokens=NVT))
    ids, mask = batch(left_pad=False)
    assert_close(logits(bert, ids, mask)[0], logits(bert, ids[:1, :6], None)[0])


def sft_batch() -> dict[str, torch.Tensor]:
    """A right-padded SFT batch: labels only on the 'assistant' tail of each example."""
    g = torch.Generator().manual_seed(2)
    examples = []
    for length, prompt in ((11, 6), (7, 3), (9, 5)):
        ids = torch.randint(1, 128, (length,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return pad_collate(examples, PAD)


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("arch", CAUSAL)
def test_sft_loss_and_gradients_match_peft(arch, projection):
    """Our SFT loss calls model.base_model(..., use_cache=False) directly: the hook must still
    inject the prefix, and the loss and prefix gradients must equal peft's."""
    base = base_model(arch)
    ours = copy.deepcopy(base)
    theirs = peft_model(base, arch, projection)
    ours_like(ours, theirs, projection)
    b = sft_batch()
    total, n = SFTTask(PAD).loss(ours, b)
    (total / n).backward()
    expected = theirs(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                      labels=b["labels"]).loss
    expected.backward()
    assert_close(total / n, expected)
    grads = {k: p.grad for k, p in prefix_encoder(ours).named_parameters()}
    theirs_grads = {k.removeprefix("prompt_encoder.default."): p.grad
                    for k, p in theirs.named_parameters() if p.requires_grad}
    assert grads.keys() == theirs_grads.keys()
    for k, g in grads.items():
        assert g is not None and g.abs().sum() > 0, k
        assert_close(g, theirs_grads[k], atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("arch", CAUSAL)
def test_greedy_generation_matches_peft(arch, padded):
    base = base_model(arch)
    ours = copy.deepcopy(base)
    plain = copy.deepcopy(base)
    theirs = peft_model(base, arch, projection=False)
    ours_like(ours, theirs, projection=False)
    ids, mask = batch(left_pad=True)
    if not padded:
        ids, mask = ids[1:], mask[1:]
    kwargs = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 6, "do_sample": False,
              "pad_token_id": PAD, "eos_token_id": None, "output_scores": True,
              "return_dict_in_generate": True}
    with torch.no_grad():
        expected = peft_generate(theirs, **kwargs)
        got = ours.generate(**kwargs)
        no_cache = ours.generate(**kwargs, use_cache=False)
        without = plain.generate(**kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    assert_close(torch.stack(got.scores), torch.stack(expected.scores))
    # The KV-cache path (prefix inserted once, mask widened every step) equals recomputing
    # everything each step, and the prefix changes what is generated.
    assert torch.equal(no_cache.sequences, got.sequences)
    assert_close(torch.stack(no_cache.scores), torch.stack(got.scores))
    assert not torch.allclose(torch.stack(without.scores), torch.stack(got.scores), atol=1e-3)


# ----------------------------------------------------------------------------- files


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("arch", list(MODELS))
def test_ours_to_peft(arch, projection, tmp_path):
    """BERT classifies with a new head: it trains as modules_to_save and is saved with the
    prefix (peft's SEQ_CLS adapters must carry it)."""
    model = base_model(arch)
    fresh = copy.deepcopy(model)
    head = ["classifier"] if arch == "bert" else None
    apply_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=NVT,
                                                  prefix_projection=projection,
                                                  encoder_hidden_size=24 if projection else None,
                                                  modules_to_save=head))
    if head:
        assert model.classifier.weight.requires_grad
        with torch.no_grad():
            model.classifier.weight.add_(1.0)  # as if trained
    ids, mask = batch(left_pad=arch != "bert")
    expected = logits(model, ids, mask)
    save_prefix_tuning(model, tmp_path, base_model_name_or_path="tiny", task_type=TASK[arch])
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    keys = ["base_model.classifier.bias", "base_model.classifier.weight"] if head else []
    assert sorted(load_file(tmp_path / "adapter_model.safetensors")) == keys + ["prompt_embeddings"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["inference_mode"] is True
    assert config["prefix_projection"] is projection
    theirs = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    assert theirs.peft_config["default"].num_virtual_tokens == NVT
    assert_close(logits(theirs, ids, mask), expected)


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("arch", list(MODELS))
def test_peft_to_ours(arch, projection, tmp_path):
    base = base_model(arch)
    fresh = copy.deepcopy(base)
    theirs = peft_model(base, arch, projection)
    if arch == "bert":  # peft trains the SEQ_CLS head as modules_to_save
        with torch.no_grad():
            theirs.base_model.classifier.modules_to_save["default"].weight.add_(1.0)
    ids, mask = batch(left_pad=arch != "bert")
    expected = logits(theirs, ids, mask)
    theirs.save_pretrained(tmp_path / "peft")

    cfg = load_prefix_tuning(fresh, tmp_path / "peft")
    assert (cfg.num_virtual_tokens, cfg.prefix_projection) == (NVT, False)  # flat prefix
    assert cfg.modules_to_save == (["classifier", "score"] if arch == "bert" else None)
    assert_close(logits(fresh, ids, mask), expected)
    # Saving it again gives peft's file, tensor for tensor, and the keys peft wrote.
    save_prefix_tuning(fresh, tmp_path / "ours", task_type=TASK[arch])
    peft_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    our_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert our_file.keys() == peft_file.keys()
    assert all(torch.equal(our_file[k], peft_file[k]) for k in our_file)
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    our_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for key in ("num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads",
                "num_transformer_submodules", "task_type", "inference_mode"):
        assert our_cfg[key] == peft_cfg[key], key
    assert not [f for f in os.listdir(tmp_path / "ours") if f.startswith(".")]  # no temp files


def test_registry_roundtrip(tmp_path):
    method = get_method("prefix_tuning")
    model = base_model("gpt2")
    fresh = copy.deepcopy(model)
    method.apply(model, PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True), "default")
    method.save(model, tmp_path)
    assert method_for_adapter_dir(tmp_path) is method
    cfg = method.load(fresh, tmp_path, "mine")
    assert cfg.num_virtual_tokens == 3 and adapter_names(fresh) == ["mine"]
    ids, mask = batch()
    assert_close(logits(fresh, ids, mask), logits(model, ids, mask))


# ----------------------------------------------------------------------------- behaviour


def test_only_prefix_trainable_and_loss_falls():
    model = base_model("llama").train()
    apply_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=NVT))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert list(trainable) == ["model.prefix_encoder.default.embedding.weight"]
    assert sum(p.numel() for p in trainable.values()) == NVT * 2 * 2 * 16  # layers*K/V*kv_dim
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(trainable.values(), lr=0.3)
    task, b = SFTTask(PAD), sft_batch()
    losses = []
    for _ in range(6):
        total, n = task.loss(model, b)
        opt.zero_grad()
        (total / n).backward()
        opt.step()
        losses.append(float(total / n))
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_bf16_frozen_weights_under_autocast():
    """The trainer's bf16 mode: frozen weights bf16, prefix fp32, autocast matmuls."""
    model = base_model("llama")
    plain, n_plain = SFTTask(PAD).loss(model, sft_batch())
    apply_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=NVT))
    enc = prefix_encoder(model)
    with torch.no_grad():  # a prefix of std ~10 (a trained one's scale), not ~1: a visible effect
        enc.embedding.weight.mul_(10)
    b = sft_batch()
    total, n = SFTTask(PAD).loss(model, b)
    reference = float(total / n)
    # The tolerance comes from what the prefix does to the loss (~0.017 nats); bf16 moves it by
    # ~2e-4. A bf16 path that lost the prefix would be off by the whole effect.
    tol = 0.1 * abs(reference - float(plain / n_plain))
    prepare_precision(model, "bf16")
    assert enc.embedding.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, n = SFTTask(PAD).loss(model, b)
    (total / n).backward()
    assert enc.embedding.weight.grad is not None and enc.embedding.weight.grad.abs().sum() > 0
    assert abs(float(total / n) - reference) < tol


def test_disable_remove_and_switch_adapters():
    model = base_model("llama")
    plain = copy.deepcopy(model)
    ids, mask = batch()
    base = logits(plain, ids, mask)
    apply_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=NVT))
    first = logits(model, ids, mask)
    with torch.no_grad():  # the returned cache holds the prefix, unless no cache was asked for
        assert output_cache(model(input_ids=ids)).get_seq_length() == NVT + ids.shape[1]
        assert output_cache(model(input_ids=ids, use_cache=False)) is None
    with disable_adapters(model):
        assert_close(logits(model, ids, mask), base)
    assert_close(logits(model, ids, mask), first)

    apply_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=2), "other")
    assert adapter_names(model) == ["default", "other"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "model.prefix_encoder.other.embedding.weight"]
    assert not torch.allclose(logits(model, ids, mask), first, atol=1e-3)
    set_adapter(model, "default")
    assert_close(logits(model, ids, mask), first)

    clone = copy.deepcopy(model)  # a deep copy owns its hooks: removing them there ...
    remove_prefix_tuning(clone)
    assert_close(logits(model, ids, mask), first)  # ... leaves the original alone
    remove_prefix_tuning(model)
    assert not hasattr(model.model, "prefix_encoder") and not model.model._forward_pre_hooks
    assert not model.model._forward_hooks
    assert_close(logits(model, ids, mask), base)
    assert_close(logits(clone, ids, mask), base)


def test_recipe_trains_saves_and_peft_loads(tiny_chat_model_dir, demo_data_dir, tmp_path):
    """End to end through the trainer (bf16 frozen weights + autocast), the registry loader,
    and peft reading what the recipe saved."""
    import peftlab
    from peftlab.models import load_model

    cfg = {"model": str(tiny_chat_model_dir),
           "method": {"name": "prefix_tuning", "num_virtual_tokens": 4},
           "data": {"train": str(demo_data_dir["train"]), "validation_split": 0.0, "max_rows": 16},
           "train": {"max_steps": 3, "batch_size": 8, "lr": 3e-2, "precision": "bf16"},
           "output_dir": str(tmp_path / "run")}
    summary = peftlab.train(cfg, progress=False)
    assert summary.trainable_params == 4 * 2 * 2 * 32  # nvt * layers * K/V * kv_dim
    adapter = tmp_path / "run" / "adapter"
    ours, _ = load_model(str(tiny_chat_model_dir))
    assert method_for_adapter_dir(adapter).load(ours, adapter).num_virtual_tokens == 4
    base, _ = load_model(str(tiny_chat_model_dir))
    theirs = peft.PeftModel.from_pretrained(base, adapter).eval()
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    assert_close(logits(ours.eval(), ids, None), logits(theirs, ids, None))


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("fields, key", [
    ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
    ({"encoder_hidden_size": 8}, "encoder_hidden_size"),
    ({"prefix_projection": True, "encoder_hidden_size": 0}, "encoder_hidden_size"),
])
def test_config_validation_names_the_field(fields, key):
    with pytest.raises(ConfigError, match=f"method.{key}"):
        apply_prefix_tuning(base_model("gpt2"), PrefixTuningConfig(**fields))


def test_unsupported_models_are_refused():
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64,
                                             num_layers=1, num_heads=4))
    with pytest.raises(NotImplementedError, match="encoder-decoder"):
        apply_prefix_tuning(t5, PrefixTuningConfig())
    model = base_model("gpt2")
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        apply_prefix_tuning(model, PrefixTuningConfig())


@pytest.fixture
def saved(tmp_path):
    model = base_model("llama")
    apply_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=NVT))
    save_prefix_tuning(model, tmp_path)
    return tmp_path


def _edit(directory, config=None, weights=None):
    if config:
        path = directory / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if weights:
        path = directory / "adapter_model.safetensors"
        tensors = load_file(path)
        weights(tensors)
        save_file(tensors, path)


@pytest.mark.parametrize("config, weights, error, text", [
    ({"peft_type": "LORA"}, None, ConfigError, "peft_type"),
    ({"num_virtual_tokens": 0}, None, ConfigError, "num_virtual_tokens"),
    ({"num_transformer_submodules": 2}, None, ConfigError, "num_transformer_submodules"),
    ({"modules_to_save": ["classifier"]}, None, ValueError, "modules_to_save.*matched no module"),
    ({"modules_to_save": "lm_head"}, None, ConfigError, "modules_to_save"),
    ({"modules_to_save": ["lm_head"]}, None, ValueError, "missing key 'base_model.lm_head.weight'"),
    ({"num_layers": 3}, None, ValueError, "num_layers"),
    ({"token_dim": 32}, None, ValueError, "token_dim"),
    (None, lambda t: t.pop("prompt_embeddings"), ValueError, "missing key 'prompt_embeddings'"),
    (None, lambda t: t.update(extra=torch.zeros(1)), ValueError, "unexpected key 'extra'"),
    (None, lambda t: t.update(prompt_embeddings=torch.zeros(4, 64)), ValueError, "shape"),
])
def test_bad_adapter_names_file_and_key(saved, config, weights, error, text):
    _edit(saved, config, weights)
    with pytest.raises(error, match=text) as err:
        load_prefix_tuning(base_model("llama"), saved)
    assert "adapter_" in str(err.value)  # names adapter_config.json / adapter_model.safetensors


def test_pickle_refused(saved):
    os.replace(saved / "adapter_model.safetensors", saved / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="adapter_model.bin"):
        load_prefix_tuning(base_model("llama"), saved)
