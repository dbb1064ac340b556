"""train.activation_checkpointing: same loss and LoRA gradients, blocks really recomputed."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from peftlab.config import ConfigError, TrainConfig, from_dict
from peftlab.methods.lora import LoraConfig, apply_lora, lora_layers
from peftlab.models import load_model
from peftlab.tasks.sft.task import IGNORE, SFTTask
from peftlab.training.trainer import Trainer, enable_activation_checkpointing


def lora_model(model_dir):
    model, _ = load_model(str(model_dir))
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1, init="random"))
    return model.train()


def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :5] = IGNORE  # prompt tokens
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def loss_and_grads(model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks in both runs (checkpointing replays the RNG)
    loss, n = SFTTask(pad_id=0).loss(model, batch())
    (loss / n).backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()
                           if p.requires_grad}


def test_same_loss_and_lora_gradients_with_checkpointing(tiny_chat_model_dir):
    model = lora_model(tiny_chat_model_dir)
    loss, grads = loss_and_grads(model)

    enable_activation_checkpointing(model)
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    calls = []
    q0 = lora_layers(model)["model.layers.0.self_attn.q_proj"]
    hook = q0.register_forward_hook(lambda *_: calls.append(1))
    loss_ckpt, grads_ckpt = loss_and_grads(model)
    hook.remove()

    assert len(calls) == 2  # forward, then the recompute in backward: it really checkpoints
    assert_close(loss_ckpt, loss)
    assert grads_ckpt.keys() == grads.keys() and len(grads) == 2 * 7 * 2  # A, B x 7 x 2 layers
    for name, g in grads.items():
        assert g.abs().sum() > 0, name  # gradients reach every LoRA parameter, layer 0 too
        assert_close(grads_ckpt[name], g, msg=name)


def test_trainer_enables_it_from_the_config(tiny_chat_model_dir):
    model = lora_model(tiny_chat_model_dir)
    examples = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}]
    Trainer(model, SFTTask(pad_id=0), examples, None, TrainConfig(), "unused", progress=False)
    assert not any(layer.gradient_checkpointing for layer in model.model.layers)
    Trainer(model, SFTTask(pad_id=0), examples, None,
            TrainConfig(activation_checkpointing=True), "unused", progress=False)
    assert all(layer.gradient_checkpointing for layer in model.model.layers)


def test_unsupported_model_is_a_config_error():
    model = nn.Sequential(nn.Linear(4, 4))
    examples = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}]
    with pytest.raises(ConfigError, match="train.activation_checkpointing"):
        Trainer(model, SFTTask(pad_id=0), examples, None,
                TrainConfig(activation_checkpointing=True), "unused", progress=False)


def test_config_field():
    cfg = from_dict({"model": "x", "train": {"activation_checkpointing": True}})
    assert cfg.train.activation_checkpointing is True
    assert from_dict({"model": "x"}).train.activation_checkpointing is False


def saved_loss_and_grads(model: nn.Module) -> tuple[int, torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`loss_and_grads`, plus the bytes of activations autograd saved for backward
    (outside checkpoints; weights are saved by reference, free, so not counted)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, grads = loss_and_grads(model)
    return saved[0], loss, grads


def test_compiled_blocks_keep_the_checkpoint_inside_their_graph(tiny_chat_model_dir):
    """train.compile with activation checkpointing: each block compiles whole, the checkpoint
    inside its graph (transformers checkpoints ``forward``, which dynamo traces as a
    higher-order op; without peftlab's flag a context-variable write in the attention broke
    the graph there and the blocks ran eager). The compiled blocks then save a fraction of the
    activations and give the loss and LoRA gradients of compiled blocks without
    checkpointing, dropout masks included."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from peftlab.training.compile import compiled_blocks

    torch._dynamo.reset()
    counters.clear()
    model = lora_model(tiny_chat_model_dir)  # LoRA dropout 0.1
    with compiled_blocks(model, True):
        saved, loss, grads = saved_loss_and_grads(model)
        enable_activation_checkpointing(model)
        saved_ckpt, loss_ckpt, grads_ckpt = saved_loss_and_grads(model)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 2  # the block without and with the checkpoint
    assert saved_ckpt < 0.25 * saved, (saved_ckpt, saved)  # block inputs, RNG states
    assert_close(loss_ckpt, loss)
    assert grads_ckpt.keys() == grads.keys()
    for name, g in grads.items():
        assert g.abs().sum() > 0, name
        assert_close(grads_ckpt[name], g, msg=name)
