"""Greedy decoding with finished rows leaving the batch must produce exactly the tokens of
transformers' generate(do_sample=False), including rows that stop early."""

from __future__ import annotations

import torch

from peftlab.evaluation.generate import _hf_generate, generate_replies, greedy_generate
from peftlab.models import load_model

CHATS = [[{"role": "user", "content": q}] for q in
         ("capital of the sea?", "a much longer question about the history of the town",
          "hi", "what colour is the river in the north of the map")]


def _trim(row: list[int], stops: set[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in stops:
            return row[:i + 1]
    return row


def _diverse_model(model_dir):
    """The tiny random model repeats one token; larger weights make replies vary."""
    model, tok = load_model(str(model_dir))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.5)
    return model.eval(), tok


def test_greedy_generate_equals_transformers_generate(tiny_chat_model_dir):
    model, tok = _diverse_model(tiny_chat_model_dir)
    tok.padding_side = "left"
    prompts = [tok.apply_chat_template(c, add_generation_prompt=True) for c in CHATS]
    prompts = [p if isinstance(p, list) else p["input_ids"] for p in prompts]
    free = _hf_generate(model, tok, prompts, 12, [tok.eos_token_id], False, 1.0, 1.0)
    # stop on a token row 0 emits early, so rows really leave the batch at different steps
    stop = free[0][2]
    stops = [stop, tok.eos_token_id]
    expected = [_trim(r, set(stops)) for r in _hf_generate(model, tok, prompts, 12, stops,
                                                           False, 1.0, 1.0)]
    got = greedy_generate(model, prompts, 12, stops, tok.pad_token_id)
    assert got == expected
    lengths = sorted(len(r) for r in got)
    assert lengths[0] <= 3 and lengths[-1] == 12  # one row stopped early, one ran to the end
    assert greedy_generate(model, prompts[:1], 1, stops, tok.pad_token_id) == [expected[0][:1]]


def test_generate_replies_uses_the_same_tokens(tiny_chat_model_dir):
    model, tok = _diverse_model(tiny_chat_model_dir)
    replies = generate_replies(model, tok, CHATS, max_new_tokens=10, batch_size=3)
    tok.padding_side = "left"
    from peftlab.data.sft import encode_prompt
    from peftlab.evaluation.generate import stop_token_ids

    for chat, reply in zip(CHATS, replies, strict=True):
        ref = _hf_generate(model, tok, [encode_prompt(chat, tok)], 10, stop_token_ids(tok),
                           False, 1.0, 1.0)[0]
        assert reply == tok.decode(ref, skip_special_tokens=True).strip()
    assert len(set(replies)) == len(replies)  # the check compares real, different replies


def test_sampling_parameters_are_applied_and_reproducible(tiny_chat_model_dir):
    """generate_replies(do_sample=True): the torch seed reproduces the replies, and
    temperature/top_p reach the sampler (at their limits it must return the greedy replies:
    top_p -> 0 keeps only the most likely token, temperature -> 0 puts all the mass on it)."""
    model, tok = _diverse_model(tiny_chat_model_dir)
    greedy = generate_replies(model, tok, CHATS, max_new_tokens=6)

    def sampled(seed: int, temperature: float, top_p: float) -> list[str]:
        torch.manual_seed(seed)
        return generate_replies(model, tok, CHATS, max_new_tokens=6, do_sample=True,
                                temperature=temperature, top_p=top_p)

    free = sampled(0, 1.0, 1.0)
    assert free == sampled(0, 1.0, 1.0) and free != sampled(1, 1.0, 1.0)
    assert free != greedy
    for seed in (0, 1):
        assert sampled(seed, 1.0, 1e-6) == greedy
        assert sampled(seed, 1e-4, 1.0) == greedy


def test_bf16_decoding_with_packed_weights_gives_the_unpacked_tokens(tiny_chat_model_dir,
                                                                     monkeypatch):
    """generate_tokens packs every linear layer for the CPU's matmul kernel (bf16 products
    are bit-identical, so the tokens must be too)."""
    import peftlab.evaluation.generate as gen
    from peftlab.data.sft import encode_prompt
    from peftlab.evaluation.generate import generate_tokens, stop_token_ids
    from peftlab.runtime.packed_linear import packed_linears, packs

    model, tok = _diverse_model(tiny_chat_model_dir)
    model.to(torch.bfloat16)
    prompts = [encode_prompt(c, tok) for c in CHATS]
    tok.padding_side = "left"
    expected = [greedy_generate(model, [p], 10, stop_token_ids(tok), tok.pad_token_id)[0]
                for p in prompts]
    swapped: list[int] = []

    def spy(m):
        ctx = packed_linears(m)

        class Recorder:
            def __enter__(self):
                swapped.append(ctx.__enter__())

            def __exit__(self, *exc):
                return ctx.__exit__(*exc)
        return Recorder()

    monkeypatch.setattr(gen, "packed_linears", spy)
    got = generate_tokens(model, tok, prompts, max_new_tokens=10, batch_size=4)
    n_linear = sum(type(m) is torch.nn.Linear for m in model.modules())
    assert n_linear > 0 and swapped == [n_linear if packs(torch.bfloat16) else 0]
    assert got == expected and len({tuple(r) for r in got}) > 1
