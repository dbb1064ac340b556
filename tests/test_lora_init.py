"""PiSSA / OLoRA inits against peft (``init_lora_weights="pissa"/"olora"``): the initial
adapter and the residual base weights, the saved adapter (peft's conversion to a plain LoRA
of the original base) and loading peft's unconverted adapters."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from peftlab.config import ConfigError
from peftlab.methods.lora import (
    LoraConfig,
    apply_lora,
    disable_adapters,
    load_lora,
    merge_and_unload,
    save_lora,
)
from peftlab.methods.lora_init import initial_factors

peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

INITS = ["pissa", "olora"]
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def peft_init_model(base: torch.nn.Module, init: str, use_rslora: bool) -> torch.nn.Module:
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=init,
                          use_rslora=use_rslora)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(base, cfg).eval()


def ours_sd(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.state_dict())


def theirs_sd(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k.removeprefix("base_model.model."): v for k, v in model.state_dict().items()}


def perturb_like_training(theirs: torch.nn.Module) -> None:
    """Move peft's A, B away from their init, as training would."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("use_rslora", [False, True])
def test_initial_adapter_and_residual_base_equal_peft(init, use_rslora):
    base = tiny_llama()
    original, ours = copy.deepcopy(base), copy.deepcopy(base)
    theirs = peft_init_model(base, init, use_rslora)
    apply_lora(ours, LoraConfig(r=4, alpha=8, init=init, use_rslora=use_rslora))

    mine, reference = ours_sd(ours), theirs_sd(theirs)
    assert mine.keys() == reference.keys()
    for key in mine:  # lora_A/lora_B and every (residual) base weight
        assert_close(mine[key], reference[key], msg=key)
    q = "model.layers.0.self_attn.q_proj"
    assert not torch.allclose(mine[f"{q}.base_layer.weight"],
                              original.state_dict()[f"{q}.weight"])  # the base did change
    assert_close(logits(ours), logits(original))  # ... and the model did not
    with disable_adapters(ours):  # the frozen reference of DPO/PPO is the original model
        assert_close(logits(ours), logits(original))


@pytest.mark.parametrize("init", INITS)
def test_pissa_is_the_best_rank_r_part(init):
    """A property, not just agreement with peft: PiSSA's s*B0*A0 is the truncated SVD of W;
    OLoRA's B0 has orthonormal columns and s*B0*A0/s is W's first r QR components."""
    w = torch.randn(12, 10, generator=torch.Generator().manual_seed(0))
    a0, b0 = initial_factors(init, w, 3, scaling=2.0)
    if init == "pissa":
        u, s, vh = torch.linalg.svd(w)
        assert_close(2.0 * b0 @ a0, u[:, :3] @ torch.diag(s[:3]) @ vh[:3])
    else:
        assert_close(b0.T @ b0, torch.eye(3))
        q, r = torch.linalg.qr(w)
        assert_close(b0 @ a0, q[:, :3] @ r[:3])


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("use_rslora", [False, True])
def test_saved_adapter_equals_peft_conversion_and_loads_on_the_original_base(init, use_rslora,
                                                                              tmp_path):
    base = tiny_llama()
    original, ours = copy.deepcopy(base), copy.deepcopy(base)
    theirs = peft_init_model(base, init, use_rslora)
    # peft's recipe: save the initial adapter as a plain one before training ...
    theirs.peft_config["default"].init_lora_weights = True
    theirs.save_pretrained(tmp_path / "peft_init")
    theirs.peft_config["default"].init_lora_weights = init
    apply_lora(ours, LoraConfig(r=4, alpha=8, init=init, use_rslora=use_rslora))
    perturb_like_training(theirs)
    ours.load_state_dict(theirs_sd(theirs))  # the same 'trained' adapter on both sides
    trained = logits(ours)
    assert_close(trained, logits(theirs))
    assert not torch.allclose(trained, logits(original), atol=1e-3)
    # ... and convert against it when saving the trained one
    theirs.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(
        tmp_path / "peft_init"))
    save_lora(ours, tmp_path / "ours")

    peft_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    our_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert our_file.keys() == peft_file.keys()
    for key in our_file:
        assert_close(our_file[key], peft_file[key], msg=key)
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    our_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "init_lora_weights", "use_rslora"):
        assert our_cfg[key] == pytest.approx(peft_cfg[key]), key
    assert our_cfg["r"] == 8

    # the file is a plain LoRA of the original base: peft and peftlab both reproduce the model
    again = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "ours").eval()
    assert_close(logits(again), trained)
    fresh = copy.deepcopy(original)
    cfg = load_lora(fresh, tmp_path / "ours")
    assert (cfg.r, cfg.init) == (8, "kaiming")
    assert_close(logits(fresh), trained)
    # merged, the weights are W_res + s B A (export path)
    assert_close(logits(merge_and_unload(ours)), trained)


@pytest.mark.parametrize("init", INITS)
def test_peft_unconverted_adapter_loads_as_plain_lora(init, tmp_path):
    """peft may save a PiSSA/OLoRA adapter as is (``init_lora_weights: "pissa"``); peft then
    recomputes the residual from the base when loading. We load it as the equivalent
    rank-2r plain LoRA on the unmodified base."""
    base = tiny_llama()
    original = copy.deepcopy(base)
    theirs = peft_init_model(base, init, use_rslora=False)
    perturb_like_training(theirs)
    expected = logits(theirs)
    theirs.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == init

    fresh = copy.deepcopy(original)
    cfg = load_lora(fresh, tmp_path)
    assert (cfg.r, cfg.alpha, cfg.init) == (8, 16.0, "kaiming")
    assert_close(logits(fresh), expected)
    q = fresh.model.layers[0].self_attn.q_proj
    assert torch.equal(q.base_layer.weight, original.model.layers[0].self_attn.q_proj.weight)
    assert q.residual_adapter is None


def test_conv1d_base_gets_the_same_maths():
    """GPT-2 stores (in, out); the init reads and writes W as (out, in) (peft's OLoRA does not
    support Conv1D, so this is checked by the invariant, not against peft)."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=128)).eval()
    original = copy.deepcopy(model)
    apply_lora(model, LoraConfig(r=4, alpha=8, init="olora", target_modules=["c_attn"]))
    layer = model.transformer.h[0].attn.c_attn
    assert_close(layer.base_weight() + layer.delta_weight("default"),
                 original.transformer.h[0].attn.c_attn.weight.T)
    assert_close(logits(model), logits(original))


def test_refused_combinations_fail_before_touching_the_model():
    with pytest.raises(ConfigError, match="method.init.*use_dora"):
        LoraConfig(init="pissa", use_dora=True).validate("method")
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="method.r: .*r must be <= 32"):
        apply_lora(model, LoraConfig(r=40, init="pissa"))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    apply_lora(model, LoraConfig(r=4, init="pissa", target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="PiSSA/OLoRA adapter 'default'"):
        apply_lora(model, LoraConfig(r=4, target_modules=["v_proj"]), adapter_name="other")
    other = tiny_llama()
    apply_lora(other, LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="only adapter"):
        apply_lora(other, LoraConfig(r=4, init="olora", target_modules=["v_proj"]), "second")
