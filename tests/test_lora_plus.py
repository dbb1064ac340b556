"""LoRA+ (``method.lora_plus_ratio``): the optimizer groups equal peft's
``create_loraplus_optimizer``, the schedule keeps the ratio, checkpoints restore it, and one
AdamW step really moves B ratio times further than A."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from peftlab.config import ConfigError, TrainConfig
from peftlab.methods import get_method, optimizer_param_groups
from peftlab.methods.lora import LoraConfig, apply_lora
from peftlab.runtime import checkpoint as ckpt
from peftlab.runtime.optim import make_optimizer, set_lr

peft = pytest.importorskip("peft")
create_loraplus_optimizer = pytest.importorskip("peft.optimizers").create_loraplus_optimizer
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

LR, RATIO, DECAY = 1e-3, 16.0, 0.05


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2))


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=128, hidden_size=32,
                                                    num_hidden_layers=2, num_attention_heads=4,
                                                    intermediate_size=64, num_labels=3))


# (model, LoRA options, non-empty groups): DoRA's 1-D magnitudes (A / B); a classifier (2-D
# weight, bias) and a LayerNorm trained in full: every branch (A / B / B without decay)
CASES = {
    "llama_dora": (tiny_llama, {"target_modules": "all-linear", "use_dora": True}, 2),
    "bert_modules_to_save": (tiny_bert, {"target_modules": ["query", "value"],
                                         "modules_to_save": ["classifier",
                                                             "embeddings.LayerNorm"]}, 3),
}


def _canonical(name: str) -> str:
    """peft's parameter names -> ours (peft nests DoRA's m and modules_to_save copies)."""
    name = name.removeprefix("base_model.model.")
    name = name.replace("lora_magnitude_vector.default.weight", "lora_magnitude_vector.default")
    return name.replace("modules_to_save.default.", "")


def _groups(optimizer: torch.optim.Optimizer, model: nn.Module) -> set[tuple]:
    names = {id(p): _canonical(n) for n, p in model.named_parameters()}
    return {(round(g["lr"], 12), g["weight_decay"], frozenset(names[id(p)] for p in g["params"]))
            for g in optimizer.param_groups if g["params"]}


@pytest.mark.parametrize("case", list(CASES))
def test_param_groups_equal_peft_create_loraplus_optimizer(case):
    build, options, n_groups = CASES[case]
    base = build()
    ours = copy.deepcopy(base)
    peft_options = {k: v for k, v in options.items() if k != "use_dora"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(base, peft.LoraConfig(
            r=4, use_dora=options.get("use_dora", False), **peft_options))
    reference = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=LR,
                                          loraplus_lr_ratio=RATIO, loraplus_weight_decay=DECAY)

    cfg = LoraConfig(r=4, lora_plus_ratio=RATIO, **options)
    apply_lora(ours, cfg)
    groups = optimizer_param_groups(ours, get_method("lora"), cfg)
    optimizer = make_optimizer(groups, TrainConfig(lr=LR, weight_decay=DECAY))

    expected = _groups(reference, theirs)
    assert len(expected) == n_groups
    assert _groups(optimizer, ours) == expected


def test_without_ratio_one_plain_group():
    model = tiny_llama()
    cfg = LoraConfig(r=4)
    apply_lora(model, cfg)
    groups = optimizer_param_groups(model, get_method("lora"), cfg)
    assert len(groups) == 1
    assert len(groups[0]["params"]) == sum(p.requires_grad for p in model.parameters())


def test_schedule_keeps_the_ratio_and_checkpoints_restore_it(tmp_path):
    model = tiny_llama()
    cfg = LoraConfig(r=4, lora_plus_ratio=RATIO)
    apply_lora(model, cfg)
    tcfg = TrainConfig(lr=LR, scheduler="cosine", warmup_steps=2)
    optimizer = make_optimizer(optimizer_param_groups(model, get_method("lora"), cfg), tcfg)
    for step in (0, 1, 5, 9):
        lr = set_lr(optimizer, tcfg, step, 10, 2)
        assert [g["lr"] for g in optimizer.param_groups if g["params"]] == [lr, lr * RATIO]
    ckpt.save_checkpoint(tmp_path / "c", model, optimizer, {"step": 9})
    again = make_optimizer([p for p in model.parameters() if p.requires_grad], tcfg)  # 1 group
    with pytest.raises(ValueError):  # a checkpoint never silently maps onto other groups
        ckpt.load_checkpoint(tmp_path / "c", model, again)
    restored = make_optimizer(optimizer_param_groups(model, get_method("lora"), cfg),
                              TrainConfig(lr=LR))
    ckpt.load_checkpoint(tmp_path / "c", model, restored)
    set_lr(restored, tcfg, 3, 10, 2)
    scales = [g["lr_scale"] for g in restored.param_groups]
    assert scales[:2] == [1.0, RATIO]


def test_one_adamw_step_moves_b_ratio_times_further():
    """Adam's first step moves every weight by ~lr (g / |g|): B by lr x ratio, A by lr."""
    model = tiny_llama()
    cfg = LoraConfig(r=4, init="random", lora_plus_ratio=RATIO, target_modules=["q_proj"])
    apply_lora(model, cfg)
    q = model.model.layers[0].self_attn.q_proj
    a0, b0 = q.lora_A["default"].weight.detach().clone(), q.lora_B["default"].weight.detach().clone()
    optimizer = make_optimizer(optimizer_param_groups(model, get_method("lora"), cfg),
                               TrainConfig(lr=LR))
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    moved_a = (q.lora_A["default"].weight - a0).abs().max().item()
    moved_b = (q.lora_B["default"].weight - b0).abs().max().item()
    assert moved_a == pytest.approx(LR, rel=1e-2)
    assert moved_b == pytest.approx(LR * RATIO, rel=1e-2)


def test_bad_ratio_is_a_config_error():
    with pytest.raises(ConfigError, match="method.lora_plus_ratio must be > 0"):
        LoraConfig(lora_plus_ratio=0).validate("method")
