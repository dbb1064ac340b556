"""BERT-style masking for masked-LM pre-training (Devlin et al. 2019).

Each maskable token is selected with probability ``probability`` (15%). A selected token
is the target of the loss (its label is the original id; every other label is -100) and
in the input it is replaced by the mask token 80% of the time, by a uniformly random
token 10% of the time and kept 10% of the time, so the model cannot rely on seeing
[MASK] wherever it has to predict. Whole-word masking selects *words* (a token that starts
a word and the tokens that continue it) instead of tokens, so a word is never half visible.

Special tokens (CLS, SEP, padding) are never selected. A row with maskable tokens but no
selection gets its lowest-drawn token selected, so a batch never has zero targets.
Training batches are masked afresh each time (dynamic masking, drawn from the torch RNG,
which checkpoints save and restore); validation rows are masked once with a seeded
generator so every evaluation scores the same targets.
"""

from __future__ import annotations

import torch

from peftlab.data.collate import IGNORE_INDEX

MASK_SHARE = 0.8  # of the selected tokens: replaced by the mask token
RANDOM_SHARE = 0.1  # replaced by a random token (the rest, 10%, stays unchanged)


def mask_tokens(input_ids: torch.Tensor, maskable: torch.Tensor, probability: float,
                mask_id: int, vocab_size: int, word_starts: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(masked input_ids, labels)`` for a ``(batch, length)`` batch.

    ``maskable`` is False at special and padding positions. ``word_starts`` (bool, same
    shape) switches on whole-word masking: a token is selected with the token starting its
    word. ``generator`` None draws from the global torch RNG.
    """
    if not 0.0 < probability < 1.0:
        raise ValueError(f"masking probability must be in (0, 1), got {probability}")
    maskable = maskable.bool()
    draws = torch.rand(input_ids.shape, generator=generator)
    if word_starts is not None:
        # Every token takes the draw of the token that starts its word.
        index = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        start_of = torch.cummax(torch.where(word_starts.bool(), index, 0), dim=1).values
        draws = draws.gather(1, start_of)
    selected = (draws < probability) & maskable
    empty = ~selected.any(dim=1) & maskable.any(dim=1)
    if empty.any():  # every row with something to predict predicts at least one token
        fallback = draws.masked_fill(~maskable, 2.0).argmin(dim=1)
        rows = empty.nonzero()[:, 0]
        if word_starts is not None:
            first = start_of[rows, fallback[rows]]
            selected[rows] |= (start_of[rows] == first[:, None]) & maskable[rows]
        else:
            selected[rows, fallback[rows]] = True
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    kind = torch.rand(input_ids.shape, generator=generator)
    masked = input_ids.clone()
    masked[selected & (kind < MASK_SHARE)] = mask_id
    use_random = selected & (kind >= MASK_SHARE) & (kind < MASK_SHARE + RANDOM_SHARE)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator,
                               dtype=input_ids.dtype)
    masked[use_random] = random_ids[use_random]
    return masked, labels
