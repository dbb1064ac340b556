"""Shared fixtures: a tiny random Llama chat model with its own tiny tokenizer, on disk.

Built offline in well under a second, so trainer and CLI tests can run the real
code paths (load_model from a directory, chat template, LoRA, checkpoints).

The tiny model's 0.02-scale weights make it greedily repeat one token that decodes to ``''``,
so a generation test on it compares empty strings. ``diverse_chat_model_dir`` is the same
model with larger weights: its greedy replies are non-empty, differ between prompts, and a
few LoRA steps change them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from peftlab.lab.demo_data import generate_demo_data

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _corpus() -> list[str]:
    rows = generate_demo_data(seed=0)["train"]
    return [r["instruction"] + " " + r["output"] for r in rows] + ["user assistant system"]


def build_tiny_chat_model(directory: Path, seed: int = 0) -> Path:
    """Save a tiny Llama + ChatML BPE tokenizer into ``directory``; return it."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True,
                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
                         bos_token_id=None)
    model = LlamaForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


def build_diverse_chat_model(directory: Path, seed: int = 0, std: float = 0.1) -> Path:
    """The tiny chat model with every matrix drawn from N(0, std): varied, non-empty replies."""
    build_tiny_chat_model(directory, seed)
    model = LlamaForCausalLM.from_pretrained(directory)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, std)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def diverse_chat_model_dir(tmp_path_factory) -> Path:
    return build_diverse_chat_model(tmp_path_factory.mktemp("diverse-llama"))


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory) -> dict[str, Path]:
    from peftlab.lab.demo_data import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("demo-data"))


def pytest_collection_modifyitems(config, items) -> None:
    """llama.cpp tests are opt-in: they run only when ``-m`` names ``llamacpp``."""
    if "llamacpp" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="opt-in: run with pytest -m llamacpp")
    for item in items:
        if "llamacpp" in item.keywords:
            item.add_marker(skip)
