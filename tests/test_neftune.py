"""NEFTune (``train.neftune_alpha``): transformers' noise rule, training steps only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from transformers.integrations.neftune import neftune_post_forward_hook

import peftlab
from peftlab.config import ConfigError, from_dict
from peftlab.runtime.neftune import add_noise, neftune


class Embedder(nn.Module):
    """The smallest model with input embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids)


IDS = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(0))


def test_noise_equals_transformers_hook():
    emb = nn.Embedding(50, 16).train()
    clean = emb(IDS)
    emb.neftune_noise_alpha = 5.0
    torch.manual_seed(1)
    reference = neftune_post_forward_hook(emb, (IDS,), clean)
    torch.manual_seed(1)
    ours = add_noise(emb, (IDS,), clean, alpha=5.0)
    assert_close(ours, reference)
    bound = 5.0 / (7 * 16) ** 0.5
    noise = ours - clean
    assert noise.abs().max() <= bound and noise.abs().max() > 0.5 * bound


def test_noise_only_in_training_mode_and_only_inside_the_block():
    model = Embedder()
    clean = model(IDS).detach()
    with neftune(model, 5.0):
        assert not torch.equal(model.train()(IDS), clean)
        assert torch.equal(model.eval()(IDS), clean)  # evaluation, generation
    assert torch.equal(model.train()(IDS), clean)  # hook removed
    assert not model.embed._forward_hooks
    with neftune(model, None):
        assert torch.equal(model(IDS), clean)


def _cfg(model_dir: Path, data: dict[str, Path], out: Path, **train) -> dict:
    return {"model": str(model_dir), "method": {"name": "lora", "r": 4, "alpha": 8},
            "data": {"train": str(data["train"]), "validation": str(data["validation"]),
                     "max_rows": 16},
            "train": {"max_steps": 2, "batch_size": 8, "precision": "fp32", "log_every": 1,
                      "eval_every": 1, **train},
            "output_dir": str(out)}


def test_trainer_adds_noise_to_training_steps_not_to_evaluation(tiny_chat_model_dir,
                                                                  demo_data_dir, tmp_path):
    """With a vanishing lr the weights stay put: the noisy run's training losses differ, its
    validation losses are those of the clean run."""
    runs = {}
    for alpha in (None, 15.0):
        cfg = _cfg(tiny_chat_model_dir, demo_data_dir, tmp_path / str(alpha), lr=1e-30,
                   neftune_alpha=alpha)
        runs[alpha] = peftlab.train(cfg, progress=False).result.history
    for clean, noisy in zip(runs[None], runs[15.0], strict=True):
        if "loss" in clean:
            assert abs(clean["loss"] - noisy["loss"]) > 1e-4
        if "val_loss" in clean:
            assert clean["val_loss"] == noisy["val_loss"]


def test_bad_alpha_and_own_loop_tasks_are_refused(tiny_chat_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="train.neftune_alpha must be > 0"):
        from_dict({"model": "x", "train": {"neftune_alpha": 0}})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hello"}\n{"prompt": "hi"}\n')
    cfg = {"model": str(tiny_chat_model_dir), "task": "ppo", "data": {"train": str(prompts)},
           "train": {"neftune_alpha": 5, "max_length": 64},
           "ppo": {"reward_function": "math:fsum", "max_new_tokens": 4},
           "output_dir": str(tmp_path / "run")}
    with pytest.raises(ConfigError, match="train.neftune_alpha is not supported by task 'ppo'"):
        peftlab.train(cfg, progress=False)
    assert not (tmp_path / "run").exists()
