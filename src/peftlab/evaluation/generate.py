"""Batched chat generation (KV cache, left padding) for evaluation, chat and the demo."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from peftlab.data.sft import encode_prompt
from peftlab.methods import has_virtual_tokens
from peftlab.models.growing_cache import growing
from peftlab.models.kv_cache import cache_kwargs
from peftlab.runtime.device import model_device, to_device
from peftlab.runtime.packed_linear import packed_linears


@torch.no_grad()
def generate_replies(model: nn.Module, tokenizer, conversations: list[list[dict]],
                     max_new_tokens: int = 64, batch_size: int = 8, do_sample: bool = False,
                     temperature: float = 0.7, top_p: float = 0.9,
                     progress: bool = False) -> list[str]:
    """The assistant's reply to each conversation (each ends with a user turn)."""
    prompts = [encode_prompt(c, tokenizer) for c in conversations]
    rows = generate_tokens(model, tokenizer, prompts, max_new_tokens, batch_size, do_sample,
                           temperature, top_p, progress)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows]


@torch.no_grad()
def generate_tokens(model: nn.Module, tokenizer, prompts: list[list[int]],
                    max_new_tokens: int = 64, batch_size: int = 8, do_sample: bool = False,
                    temperature: float = 0.7, top_p: float = 0.9,
                    progress: bool = False) -> list[list[int]]:
    """New token ids for each prompt (token ids), batched by prompt length.

    Runs in the dtype the weights are stored in: autocast would re-cast every fp32
    weight at every decoding step, which costs more than it saves on CPU. Greedy decoding
    of a plain causal LM goes through :func:`greedy_generate` (finished rows leave the
    batch); sampling and virtual-token methods use transformers' ``generate``. Linear layers
    on a CPU run with their weights packed once (:mod:`peftlab.runtime.packed_linear`).
    """
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    stop_ids = stop_token_ids(tokenizer)
    own_loop = not do_sample and _plain_causal_lm(model)
    try:
        with packed_linears(model):  # weights packed once for the CPU's matmul kernel
            starts = range(0, len(order), batch_size)
            for start in tqdm(starts, desc="generate", disable=not progress):
                idx = order[start:start + batch_size]
                if own_loop:
                    new = greedy_generate(model, [prompts[i] for i in idx], max_new_tokens,
                                          stop_ids, tokenizer.pad_token_id)
                else:
                    new = _hf_generate(model, tokenizer, [prompts[i] for i in idx], max_new_tokens,
                                       stop_ids, do_sample, temperature, top_p)
                for i, row in zip(idx, new, strict=True):
                    out[i] = row
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return out


def _hf_generate(model: nn.Module, tokenizer, prompts: list[list[int]], max_new_tokens: int,
                 stop_ids: list[int], do_sample: bool, temperature: float,
                 top_p: float) -> list[list[int]]:
    enc = to_device(tokenizer.pad({"input_ids": prompts}, return_tensors="pt").data,
                    model_device(model))
    kwargs = {"do_sample": do_sample, "max_new_tokens": max_new_tokens,
              "pad_token_id": tokenizer.pad_token_id, "eos_token_id": stop_ids}
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    out = model.generate(**enc, **kwargs)
    return out[:, enc["input_ids"].shape[1]:].tolist()


def _plain_causal_lm(model: nn.Module) -> bool:
    """A transformers causal LM whose forward takes a KV cache as is (not prompt/prefix
    tuning, which add virtual tokens around the cache)."""
    backbone = getattr(model, "base_model", None)
    return backbone is not None and backbone is not model and not has_virtual_tokens(model)


@torch.no_grad()
def greedy_generate(model: nn.Module, prompts: list[list[int]], max_new_tokens: int,
                    stop_ids: list[int], pad_id: int) -> list[list[int]]:
    """Greedy decoding of left-padded prompts with a KV cache; a row leaves the batch (and
    the cache) as soon as it emits a stop token.

    transformers' ``generate`` keeps computing every row until the longest reply ends; here
    the rest decode at a smaller batch. Returns each row's new tokens, up to and including
    its stop token. Same tokens as ``generate(do_sample=False)`` (tested), up to float ties.
    """
    n, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    device = model_device(model)
    cache = DynamicCache()
    stops = torch.tensor(stop_ids, dtype=torch.long)
    rows = torch.arange(n)  # which prompt each live batch row belongs to
    out: list[list[int]] = [[] for _ in range(n)]
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                   position_ids=positions.to(device), **cache_kwargs(model, cache), use_cache=True,
                   logits_to_keep=1).logits[:, -1]
    cache = growing(cache)  # decoding steps then write in place instead of copying the cache
    for step in range(max_new_tokens):
        token = logits.argmax(-1).cpu()
        for r, t in zip(rows.tolist(), token.tolist(), strict=True):
            out[r].append(t)
        if step == max_new_tokens - 1:
            break
        keep = (~torch.isin(token, stops)).nonzero().squeeze(1)
        if keep.numel() == 0:
            break
        if keep.numel() < rows.numel():
            cache.batch_select_indices(keep.to(device))
            rows, token, mask = rows[keep], token[keep], mask[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        position = mask.sum(-1, keepdim=True) - 1
        logits = model(input_ids=token[:, None].to(device), attention_mask=mask.to(device),
                       position_ids=position.to(device), **cache_kwargs(model, cache),
                       use_cache=True).logits[:, -1]
    return out


def stop_token_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)
