"""Prompt tuning and p-tuning: hooks instead of a wrapper, numerical parity with peft.

Same virtual-token weights in -> same logits, losses and greedy generations out as peft's
PeftModel (peft returns logits for the virtual positions too; we strip those before comparing).
peft is a test-only dependency.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from peftlab.config import ConfigError
from peftlab.methods import get_method, method_for_adapter_dir
from peftlab.methods import virtual_tokens as vt
from peftlab.methods.p_tuning import PromptEncoder, PTuningConfig
from peftlab.methods.prompt_tuning import PromptTuningConfig, apply_prompt_tuning
from peftlab.models.lm import backbone_hidden_states
from peftlab.runtime.precision import prepare_precision
from peftlab.tasks.sft.task import IGNORE, SFTTask
from tests.deps import import_test_dep
from tests.peft_reference import peft_generate

peft = import_test_dep("peft")
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

N = 4  # virtual tokens
METHODS = ["prompt_tuning", "p_tuning_mlp", "p_tuning_lstm"]


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


def base_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = MODELS[arch]().eval()
    if arch == "bert":  # std-0.02 init gives ~0.01 logits; make differences visible
        with torch.no_grad():
            model.classifier.weight.mul_(50)
    return model


def our_config(method: str, arch: str):
    to_save = ["classifier"] if arch == "bert" else None
    if method == "prompt_tuning":
        return PromptTuningConfig(num_virtual_tokens=N, modules_to_save=to_save)
    kind = method.removeprefix("p_tuning_")
    return PTuningConfig(num_virtual_tokens=N, encoder_type=kind, encoder_hidden_size=16,
                         modules_to_save=to_save)


def peft_config(method: str, arch: str):
    task = "SEQ_CLS" if arch == "bert" else "CAUSAL_LM"
    if method == "prompt_tuning":
        return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=N)
    kind = method.removeprefix("p_tuning_").upper()
    return peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=N, encoder_hidden_size=16,
                                    encoder_reparameterization_type=kind)


def method_of(method: str):
    return get_method(method.split("_mlp")[0].split("_lstm")[0])


def peft_model(base, method, arch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(base, peft_config(method, arch)).eval()


def pair(arch: str, method: str):
    """(ours, theirs) on the same base with the same prompt weights (peft's random init)."""
    base = base_model(arch)
    theirs = peft_model(copy.deepcopy(base), method, arch)
    ours = base
    method_of(method).apply(ours, our_config(method, arch), "default")
    vt.prompt_module(ours).load_state_dict(theirs.prompt_encoder["default"].state_dict())
    return ours.eval(), theirs


def inputs(arch: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if arch == "bert":
        mask[1, -2:] = 0  # right padding
        tt = torch.zeros_like(ids)
        tt[:, 4:] = 1
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": tt}
    mask[1, :2] = 0  # left padding
    return {"input_ids": ids, "attention_mask": mask}


def run(model, arch: str, theirs: bool = False) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs(arch)).logits
    return out[:, N:] if theirs and arch != "bert" else out


# ----------------------------------------------------------------------------- forward parity


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("method", METHODS)
def test_logits_match_peft(arch, method):
    ours, theirs = pair(arch, method)
    expected = run(theirs, arch, theirs=True)
    got = run(ours, arch)
    assert got.shape == (2, 3) if arch == "bert" else got.shape == (2, 7, 128)
    assert_close(got, expected)
    with vt.disable_adapters(ours):  # and the prompts really matter
        assert not torch.allclose(run(ours, arch), got, atol=1e-3)


@pytest.mark.parametrize("method", METHODS)
def test_sft_loss_matches_peft_and_labels_untouched(method):
    ours, theirs = pair("llama", method)
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    ids[1, -3:], mask[1, -3:] = 0, 0  # right padding, as pad_collate does
    labels = ids.clone()
    labels[:, :4] = IGNORE  # the prompt
    labels[mask == 0] = IGNORE
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    before = {k: v.clone() for k, v in batch.items()}

    total, n = SFTTask(pad_id=0).loss(ours, batch)
    expected = theirs(**batch).loss
    assert n == int((labels[:, 1:] != IGNORE).sum())
    assert_close(total / n, expected)
    assert all(torch.equal(batch[k], before[k]) for k in batch)
    hidden = backbone_hidden_states(ours, ids, mask)
    assert hidden.shape[:2] == ids.shape  # aligned 1:1 with the caller's tokens


# ----------------------------------------------------------------------------- generation


def generate(model, ids, mask, use_cache=True):
    if isinstance(model, peft.PeftModel):
        return peft_generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=8,
                             min_new_tokens=8, do_sample=False, pad_token_id=0)
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8,
                          do_sample=False, pad_token_id=0, use_cache=use_cache)


@pytest.mark.parametrize("arch, method", [("llama", "prompt_tuning"), ("llama", "p_tuning_mlp"),
                                          ("gpt2", "prompt_tuning")])
def test_greedy_generate_with_kv_cache_matches_peft(arch, method):
    ours, theirs = pair(arch, method)
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    got = generate(ours, ids, mask)
    assert got.shape == (2, 14)
    assert torch.equal(got, generate(ours, ids, mask, use_cache=False))
    assert torch.equal(got, generate(theirs, ids, mask))
    with vt.disable_adapters(ours):
        assert not torch.equal(generate(ours, ids, mask), got)


def test_left_padded_batch_generates_like_each_prompt_alone():
    """Positions are shifted, not dropped: a padded row decodes as the same prompt unpadded
    (peft ignores position_ids, so its padded rows depend on the padding; unpadded rows agree)."""
    ours, theirs = pair("llama", "prompt_tuning")
    long = torch.randint(1, 128, (1, 7), generator=torch.Generator().manual_seed(4))
    short = torch.randint(1, 128, (1, 4), generator=torch.Generator().manual_seed(5))
    ids = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)])
    mask = (torch.arange(7) >= torch.tensor([[0], [3]])).long()
    batch = generate(ours, ids, mask)
    alone_long = generate(ours, long, torch.ones_like(long))
    alone_short = generate(ours, short, torch.ones_like(short))
    assert torch.equal(batch[0, 7:], alone_long[0, 7:])
    assert torch.equal(batch[1, 7:], alone_short[0, 4:])
    assert torch.equal(alone_short, generate(theirs, short, torch.ones_like(short)))


# ----------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("method", METHODS)
def test_ours_to_peft(arch, method, tmp_path):
    model = base_model(arch)
    fresh = copy.deepcopy(model)
    method_of(method).apply(model, our_config(method, arch), "default")
    if arch == "bert":
        with torch.no_grad():
            model.classifier.weight.add_(1.0)  # trained in full (modules_to_save)
    expected = run(model, arch)
    method_of(method).save(model, tmp_path)  # task_type inferred from the model class
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["task_type"] == ("SEQ_CLS" if arch == "bert" else "CAUSAL_LM")
    assert (config["num_virtual_tokens"], config["token_dim"]) == (N, 32)
    keys = {"prompt_embeddings"}
    if arch == "bert":  # peft's prompt-learning prefix is "base_model.", not "base_model.model."
        keys |= {"base_model.classifier.weight", "base_model.classifier.bias"}
    assert load_file(tmp_path / "adapter_model.safetensors").keys() == keys

    theirs = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    assert_close(run(theirs, arch, theirs=True), expected)


def test_seq_cls_file_always_carries_the_head(tmp_path):
    """peft's SEQ_CLS loader requires the classifier in the file, even if it was not trained."""
    model = base_model("bert")
    fresh, fresh2 = copy.deepcopy(model), copy.deepcopy(model)
    apply_prompt_tuning(model, PromptTuningConfig(num_virtual_tokens=N))
    assert not model.classifier.weight.requires_grad
    expected = run(model, "bert")
    get_method("prompt_tuning").save(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    theirs = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    assert_close(run(theirs, "bert", theirs=True), expected)
    cfg = get_method("prompt_tuning").load(fresh2, tmp_path)
    assert cfg.modules_to_save == ["classifier"] and fresh2.classifier.weight.requires_grad
    assert_close(run(fresh2, "bert"), expected)


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("method", METHODS)
def test_peft_to_ours(arch, method, tmp_path):
    base = base_model(arch)
    fresh = copy.deepcopy(base)
    theirs = peft_model(base, method, arch)
    if arch == "bert":
        with torch.no_grad():
            theirs.base_model.classifier.modules_to_save["default"].weight.add_(1.0)
    expected = run(theirs, arch, theirs=True)
    theirs.save_pretrained(tmp_path)

    m = method_for_adapter_dir(tmp_path)
    assert m is method_of(method)
    cfg = m.load(fresh, tmp_path, "default")
    assert cfg.num_virtual_tokens == N
    assert cfg.modules_to_save == (["classifier", "score"] if arch == "bert" else None)
    assert_close(run(fresh, arch), expected)
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert "prompt_encoder.default.embedding.weight" in trainable
    if method.startswith("p_tuning"):
        # The file holds the encoder's output: loaded as final vectors, no network (as peft).
        assert cfg.encoder_type == method.removeprefix("p_tuning_")
        encoder = vt.prompt_module(fresh)
        assert isinstance(encoder, PromptEncoder) and encoder.inference_mode
        assert not hasattr(encoder, "mlp_head")


@pytest.mark.parametrize("method", METHODS)
def test_ours_roundtrip_and_file_matches_peft(method, tmp_path):
    ours, theirs = pair("llama", method)
    fresh = base_model("llama")
    method_of(method).save(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    our_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    peft_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert our_file.keys() == peft_file.keys() == {"prompt_embeddings"}
    assert_close(our_file["prompt_embeddings"], peft_file["prompt_embeddings"])
    ours_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for key in ("peft_type", "task_type", "num_virtual_tokens", "token_dim", "num_layers",
                "num_attention_heads", "num_transformer_submodules", "inference_mode",
                "encoder_reparameterization_type", "encoder_hidden_size"):
        assert ours_cfg.get(key) == peft_cfg.get(key), key
    method_of(method).load(fresh, tmp_path / "ours", "mine")
    assert_close(run(fresh, "llama"), run(ours, "llama"))


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("method", METHODS)
def test_only_prompt_params_trainable_and_loss_falls(method):
    model = base_model("llama").train()
    method_of(method).apply(model, our_config(method, "llama"), "default")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "prompt_encoder.default.embedding.weight" in trainable
    assert all(n.startswith("prompt_encoder.default.") for n in trainable)
    if method == "prompt_tuning":
        assert trainable == ["prompt_encoder.default.embedding.weight"]
    else:
        assert any(".mlp_head." in n for n in trainable)
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    task = SFTTask(pad_id=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(10):
        total, n = task.loss(model, batch)
        (total / n).backward()
        opt.step()
        opt.zero_grad()
        losses.append((total / n).item())
    # A random tiny Llama sits near the uniform loss ln(128); the prompt moves it slowly but surely.
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < losses[0] - 0.03, losses


def test_bf16_base_under_autocast():
    model = base_model("llama")
    method_of("p_tuning_mlp").apply(model, our_config("p_tuning_mlp", "llama"), "default")
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    total, n = SFTTask(pad_id=0).loss(model, batch)
    with vt.disable_adapters(model):
        plain, n_plain = SFTTask(pad_id=0).loss(model, batch)
    # The tolerance comes from what the prompt does to the loss here (~0.005 nats); bf16
    # moves it by ~2e-5. A bf16 path that lost the virtual tokens would be off by the effect.
    tol = 0.1 * abs(float(total / n - plain / n_plain))
    prepare_precision(model, "bf16")
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total16, n16 = SFTTask(pad_id=0).loss(model, batch)
    total16.backward()
    assert abs(float(total16 / n16 - total / n)) < tol
    for p in vt.prompt_module(model).parameters():
        assert p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all()


# ----------------------------------------------------------------------------- init from text


@pytest.mark.parametrize("shape", ["truncated", "repeated"])
def test_text_init_is_the_text_token_embeddings_as_peft(tiny_chat_model_dir, shape):
    text = "Classify"
    tok = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    ids = tok(text)["input_ids"]
    num_virtual_tokens = len(ids) - 2 if shape == "truncated" else 2 * len(ids) + 1
    ids = (ids * 3)[:num_virtual_tokens]

    model = LlamaForCausalLM.from_pretrained(tiny_chat_model_dir)
    apply_prompt_tuning(model, PromptTuningConfig(num_virtual_tokens=num_virtual_tokens,
                                                  init="text", init_text=text))  # model's own path
    got = vt.prompt_module(model).embedding.weight
    assert_close(got, model.model.embed_tokens.weight[ids], rtol=0, atol=0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(LlamaForCausalLM.from_pretrained(tiny_chat_model_dir),
                                     peft.PromptTuningConfig(
                                         task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens,
                                         prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
                                         tokenizer_name_or_path=str(tiny_chat_model_dir)))
    assert_close(got, theirs.prompt_encoder["default"].embedding.weight, rtol=0, atol=0)

    other = base_model("llama")
    other_ids = [3, 5, 7]
    fake_tokenizer = lambda s: {"input_ids": other_ids}  # noqa: E731  (tokenizer= beats the config)
    apply_prompt_tuning(other, PromptTuningConfig(num_virtual_tokens=3, init="text", init_text="x",
                                                  tokenizer_name_or_path="nowhere"),
                        tokenizer=fake_tokenizer)
    assert_close(vt.prompt_module(other).embedding.weight, other.model.embed_tokens.weight[other_ids])


# ----------------------------------------------------------------------------- hooks


def test_remove_hooks_restores_base_and_inputs_embeds_work():
    base = base_model("llama")
    expected = run(base, "llama")
    ours, _ = pair("llama", "prompt_tuning")
    x = inputs("llama")
    with torch.no_grad():
        by_ids = ours(**x).logits
        embeds = ours.get_input_embeddings()(x["input_ids"])
        by_embeds = ours(inputs_embeds=embeds, attention_mask=x["attention_mask"]).logits
        out = ours(**x, output_hidden_states=True)
    assert_close(by_embeds, by_ids)
    assert all(h.shape[1] == 7 for h in out.hidden_states)
    twin = copy.deepcopy(ours)  # the copy's hooks use the copy's prompts
    with torch.no_grad():
        vt.prompt_module(twin).embedding.weight.add_(1.0)
        assert not torch.allclose(twin(**x).logits, by_ids, atol=1e-3)
        assert_close(ours(**x).logits, by_ids)
    encoders = vt.remove_hooks(ours)
    assert isinstance(encoders["default"], torch.nn.Module)
    assert not hasattr(ours, "prompt_encoder") and vt.hooks_of(ours) is None
    assert_close(run(ours, "llama"), expected)


def test_hook_errors_are_clear():
    ours, _ = pair("llama", "prompt_tuning")
    with pytest.raises(ValueError, match="input_ids or inputs_embeds"):
        ours.model(attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="2-D"):
        ours(input_ids=torch.ones(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 1, 3, 3))
    with pytest.raises(ValueError, match="already has virtual tokens"):
        apply_prompt_tuning(ours, PromptTuningConfig(num_virtual_tokens=2))
    ours(input_ids=torch.ones(1, 3, dtype=torch.long))  # still usable after the errors


def test_config_errors():
    with pytest.raises(ConfigError, match="method.encoder_num_layers"):
        get_method("p_tuning").apply(base_model("llama"), PTuningConfig(encoder_num_layers=3))
    with pytest.raises(ConfigError, match="method.init_text"):
        apply_prompt_tuning(base_model("llama"), PromptTuningConfig(init="text"))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        apply_prompt_tuning(base_model("llama"), PromptTuningConfig(init="text", init_text="hi"))


@pytest.fixture
def saved(tmp_path):
    model, _ = pair("llama", "prompt_tuning")
    get_method("prompt_tuning").save(model, tmp_path)
    return tmp_path


def test_bad_files_name_file_and_key(saved):
    path = saved / "adapter_model.safetensors"
    save_file({"prompt_embeddings": torch.zeros(N + 1, 32)}, path)
    with pytest.raises(ValueError, match="'prompt_embeddings' has shape") as err:
        get_method("prompt_tuning").load(base_model("llama"), saved)
    assert "adapter_model.safetensors" in str(err.value)
    save_file({"prompt_embeddings": torch.zeros(N, 32), "base_model.lm_head.weight": torch.zeros(1)},
              path)
    with pytest.raises(ValueError, match="unexpected key 'base_model.lm_head.weight'"):
        get_method("prompt_tuning").load(base_model("llama"), saved)
    config = saved / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "token_dim": 64}))
    with pytest.raises(ConfigError, match="adapter_config.json: key 'token_dim'"):
        get_method("prompt_tuning").load(base_model("llama"), saved)
