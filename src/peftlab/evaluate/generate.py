"""Batched chat generation (KV cache, left padding) for evaluation, chat and the demo."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from peftlab.data.sft import encode_prompt


@torch.no_grad()
def generate_replies(model: nn.Module, tokenizer, conversations: list[list[dict]],
                     max_new_tokens: int = 64, batch_size: int = 8, do_sample: bool = False, temperature: float = 0.7, top_p: float = 0.9,
                     progress: bool = False) -> list[str]:
    """The assistant's reply to each conversation (each ends with a user turn).

    Runs in the dtype the weights are stored in: autocast would re-cast every fp32
    weight at every decoding step, which costs more than it saves on CPU.
    """
    was_training = model.training
    model.eval()
    prompts = [encode_prompt(c, tokenizer) for c in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies: list[str] = [""] * len(prompts)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    stop_ids = stop_token_ids(tokenizer)
    try:
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc="generate", disable=not progress):
            idx = order[start:start + batch_size]
            enc = tokenizer.pad({"input_ids": [prompts[i] for i in idx]}, return_tensors="pt")
            kwargs = {"do_sample": do_sample, "max_new_tokens": max_new_tokens,
                      "pad_token_id": tokenizer.pad_token_id, "eos_token_id": stop_ids}
            if do_sample:
                kwargs.update(temperature=temperature, top_p=top_p)
            else:
                kwargs.update(temperature=None, top_p=None, top_k=None)
            out = model.generate(**enc, **kwargs)
            new = out[:, enc["input_ids"].shape[1]:]
            for i, row in zip(idx, new, strict=True):
                replies[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return replies


def stop_token_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)
