"""peftlab.merge folds whichever mergeable method the model carries, and refuses the others."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from transformers import LlamaConfig, LlamaForCausalLM

import peftlab
from peftlab.methods.adapter import AdapterConfig, apply_adapter
from peftlab.methods.ia3 import IA3Config, IA3Linear, apply_ia3
from peftlab.methods.lora import LoraConfig, LoraLinear, apply_lora
from peftlab.methods.prompt_tuning import PromptTuningConfig, apply_prompt_tuning

IDS = torch.tensor([[1, 5, 9, 3, 7, 2], [4, 4, 8, 1, 0, 6]])


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)
    return LlamaForCausalLM(cfg).eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def assert_plain(model: torch.nn.Module) -> None:
    wrappers = [n for n, m in model.named_modules() if isinstance(m, (LoraLinear, IA3Linear))]
    assert wrappers == []


def test_merge_ia3_matches_unmerged_output():
    model = tiny_llama()
    base = logits(model)
    apply_ia3(model, IA3Config(init_ia3_weights=False))  # N(0, 1) vectors: far from identity
    before = logits(model)
    assert not torch.allclose(before, base, atol=1e-3)
    merged = peftlab.merge(model)
    assert merged is model
    assert_plain(model)
    assert_close(logits(model), before, rtol=1e-5, atol=1e-5)


def test_merge_lora_and_ia3_on_other_modules():
    model = tiny_llama()
    apply_lora(model, LoraConfig(r=2, init="random", target_modules=["q_proj", "o_proj"]))
    apply_ia3(model, IA3Config(init_ia3_weights=False))  # k_proj, v_proj, down_proj
    before = logits(model)
    peftlab.merge(model)
    assert_plain(model)
    assert_close(logits(model), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("apply, method", [
    (lambda m: apply_adapter(m, AdapterConfig()), "adapter"),
    (lambda m: apply_prompt_tuning(m, PromptTuningConfig(num_virtual_tokens=2)), "prompt_tuning"),
])
def test_merge_refuses_unmergeable_methods(apply, method):
    model = tiny_llama()
    apply(model)
    with pytest.raises(ValueError, match=f"merge: LlamaForCausalLM carries a {method}"):
        peftlab.merge(model)


def test_merge_without_adapter_is_an_error():
    with pytest.raises(ValueError, match="no adapter layers to fold.*ia3, lora"):
        peftlab.merge(tiny_llama())
