"""peft as the reference, on the transformers releases where its ``generate`` is broken.

peft (0.21) looks for the KV cache in ``generate``'s model kwargs under ``past_key_values``;
from transformers 5.24 on the key is ``cache``. For prompt-learning methods peft then takes
every decoding step for the first and inserts the virtual tokens again, and its prefix (put
under the old name next to ``cache=None``) is dropped by transformers' deprecation shim.
peft's *forward* is still right there, so on those releases the reference is greedy decoding
by one full peft forward per new token (no cache). Decided by the model's signature (what peft
looks for), not by version numbers.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from peftlab.models.kv_cache import cache_keyword


def peft_generate_works(theirs: nn.Module) -> bool:
    """False where peft's generate cannot see the cache (see the module docstring)."""
    return cache_keyword(theirs.get_base_model()) == "past_key_values"


def peft_generate(theirs: nn.Module, *, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  max_new_tokens: int, min_new_tokens: int = 0, **kwargs: Any) -> Any:
    """Greedy ``theirs.generate(...)``, or the same decoding by full forwards where it is broken.

    Returns what ``generate`` returns: the sequences, or with ``return_dict_in_generate`` an
    object with ``sequences`` and ``scores`` (the raw last-position logits of each step)."""
    if peft_generate_works(theirs):
        return theirs.generate(input_ids=input_ids, attention_mask=attention_mask,
                               max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                               **kwargs)
    if kwargs.get("do_sample") or kwargs.get("num_beams", 1) != 1:
        raise NotImplementedError("the forward-by-forward reference decodes greedily only")
    eos = kwargs.get("eos_token_id", theirs.generation_config.eos_token_id)
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if eos and min_new_tokens < max_new_tokens:
        raise NotImplementedError("the reference does not stop at eos: set eos_token_id=None "
                                  "or min_new_tokens=max_new_tokens")
    ids, mask, scores = input_ids, attention_mask, []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate derives them
            logits = theirs(input_ids=ids, attention_mask=mask,
                            position_ids=positions).logits[:, -1].float()
            logits[:, eos] = float("-inf")  # min_new_tokens: eos is never allowed here
            scores.append(logits)
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    if kwargs.get("return_dict_in_generate"):
        return SimpleNamespace(sequences=ids, scores=tuple(scores))
    return ids
