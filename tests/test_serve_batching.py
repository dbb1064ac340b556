"""Continuous batching with mixed adapters: one forward serves rows with different LoRA
adapters (or none) exactly as each row alone; requests that join a running batch, leave it
early, or are prefilled in chunks get the same greedy tokens as generating each alone;
cancellation, deadlines, the queue limit and text stop sequences behave."""

from __future__ import annotations

import queue
import time
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from peftlab.evaluation.generate import greedy_generate
from peftlab.methods import lora
from peftlab.methods.lora import LoraConfig, apply_lora, save_lora
from peftlab.models import load_model
from peftlab.models.growing_cache import cache_layers
from peftlab.serve.batch import DecodeBatch
from peftlab.serve.engine import Engine, RequestError, Sampling
from peftlab.serve.prefix_cache import PrefixCache
from peftlab.serve.scheduler import Event, JobTimeout
from peftlab.serve.text import TextStream


def _two_adapters(model) -> None:
    torch.manual_seed(1)
    apply_lora(model, LoraConfig(r=4, alpha=16, init="random",
                                 target_modules=["q_proj", "v_proj"]), "alpha")
    # another rank, other modules, and only the second block: rows of "alpha" and the base
    # must get nothing from it in the layers it skips
    apply_lora(model, LoraConfig(r=2, alpha=8, init="random", layers_to_transform=[1],
                                 target_modules=["q_proj", "gate_proj", "down_proj"]), "beta")
    model.eval().requires_grad_(False)


def _alone(model, name: str | None, **inputs) -> torch.Tensor:
    if name is None:
        with lora.disable_adapters(model):
            return model(**inputs).logits
    lora.set_adapter(model, name)
    model.requires_grad_(False)
    return model(**inputs).logits


def test_one_forward_serves_every_row_with_its_own_adapter(tiny_chat_model_dir):
    model, _ = load_model(str(tiny_chat_model_dir))
    _two_adapters(model)
    ids = torch.randint(3, 300, (4, 9))
    with torch.no_grad():
        alone = {name: torch.cat([_alone(model, name, input_ids=ids[i:i + 1]) for i in range(4)])
                 for name in ("alpha", "beta", None)}
        lora.set_adapter(model, "beta")
        model.requires_grad_(False)
        with lora.row_adapters(model, ["alpha", "beta"]) as route:
            route.set_rows(["alpha", None, "beta", "alpha"])
            mixed = model(input_ids=ids).logits
            route.set_rows(["beta", "beta", None, None])  # the masks follow the rows
            again = model(input_ids=ids).logits
        after = model(input_ids=ids).logits  # detached: the active adapter ("beta") again
    torch.testing.assert_close(mixed, torch.stack([alone["alpha"][0], alone[None][1],
                                                   alone["beta"][2], alone["alpha"][3]]))
    torch.testing.assert_close(again, torch.cat([alone["beta"][:2], alone[None][2:]]))
    torch.testing.assert_close(after, alone["beta"])
    assert not torch.allclose(alone["alpha"], alone[None])  # the adapters change the model
    assert not torch.allclose(alone["beta"], alone[None])


def test_row_adapters_refuse_what_they_cannot_batch(tiny_chat_model_dir):
    model, _ = load_model(str(tiny_chat_model_dir))
    _two_adapters(model)
    with pytest.raises(ValueError, match="not in the model"):
        lora.attach_row_adapters(model, ["alpha", "gamma"])
    with lora.row_adapters(model, ["alpha"]) as route:
        with pytest.raises(ValueError, match="not among"):
            route.set_rows(["beta"])
        route.set_rows(["alpha", None])
        with pytest.raises(ValueError, match="3 rows"):
            model(input_ids=torch.ones(3, 2, dtype=torch.long))
    apply_lora(model, LoraConfig(r=2, use_dora=True), "dora")
    with pytest.raises(ValueError, match="DoRA"):
        lora.attach_row_adapters(model, ["alpha", "dora"])


def test_decode_batch_pads_joins_and_trims():
    def cache(batch: int, length: int, value: float):
        k = torch.full((batch, 2, length, 3), value)
        return DynamicCache([(k, k + 0.5)])

    b: DecodeBatch[str] = DecodeBatch()
    b.join("a", cache(1, 2, 1.0), token=7)
    b.join("b", cache(1, 5, 2.0), token=8)
    b.join("c", cache(1, 3, 3.0), token=9)
    assert b.rows == ["a", "b", "c"] and b.last.tolist() == [7, 8, 9]
    assert b.mask.tolist() == [[0, 0, 0, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    keys = next(iter(b.cache))[0]
    assert keys.shape == (3, 2, 5, 3)
    assert keys[0, 0, :, 0].tolist() == [0, 0, 0, 1, 1] and keys[2, 0, :, 0].tolist() == [0, 0, 3, 3, 3]
    step = b.step_inputs()
    assert step["position_ids"].tolist() == [[2], [5], [3]]  # each row's own count
    assert step["input_ids"].tolist() == [[7], [8], [9]]
    b.keep([2, 0])  # "b" leaves: the two leftmost columns were only its
    assert b.rows == ["c", "a"] and b.last.tolist() == [9, 7]
    assert b.mask.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    keys, values, _ = next(iter(b.cache))
    assert keys.shape[2] == 3  # the cache has no column for the step not yet run
    assert keys[:, 0, :, 0].tolist() == [[3, 3, 3], [0, 1, 1]]
    b.keep([])
    assert len(b) == 0 and b.cache is None


@pytest.fixture(scope="module")
def adapters(tiny_chat_model_dir, tmp_path_factory) -> dict[str, Path]:
    model, _ = load_model(str(tiny_chat_model_dir))
    _two_adapters(model)
    out = {}
    for name in ("alpha", "beta"):
        out[name] = tmp_path_factory.mktemp(name)
        save_lora(model, out[name], adapter_name=name)
    return out


@pytest.fixture(scope="module")
def reference(tiny_chat_model_dir, adapters):
    model, _ = load_model(str(tiny_chat_model_dir))
    for name, path in adapters.items():
        lora.load_lora(model, path, adapter_name=name)
    return model.eval().requires_grad_(False)


def _alone_tokens(reference, engine: Engine, name: str, prompt: list[int], n: int) -> list[int]:
    adapter = None if name == engine.base_name else name
    if adapter is None:
        with lora.disable_adapters(reference):
            return greedy_generate(reference, [prompt], n, engine.stop_ids, 0)[0]
    lora.set_adapter(reference, adapter)
    reference.requires_grad_(False)
    return greedy_generate(reference, [prompt], n, engine.stop_ids, 0)[0]


def _collect(engine: Engine, name: str, prompt: list[int], sampling: Sampling):
    events: queue.SimpleQueue[Event] = queue.SimpleQueue()
    job = engine.submit(name, prompt, sampling, events.put)
    return job, events


def _drain(events, timeout: float = 60.0) -> tuple[list[int], str]:
    tokens: list[int] = []
    while True:
        e = events.get(timeout=timeout)
        if e.error is not None:
            raise e.error
        tokens += e.tokens
        if e.finish:
            return tokens, e.finish


@pytest.mark.parametrize("chunk", [256, 3])
def test_mixed_batch_gives_each_request_its_greedy_tokens_alone(tiny_chat_model_dir, adapters,
                                                                reference, chunk):
    engine = Engine(str(tiny_chat_model_dir), adapters, base_name="base", precision="fp32",
                    prefill_chunk=chunk,
                    max_batch=8)
    names = ["alpha", "base", "beta", "beta", "alpha", "base", "alpha", "beta", "base"]
    prompts = [engine.encode_chat([{"role": "user", "content": f"question {i} " * (1 + i % 4)}])
               for i in range(len(names))]
    lengths = [12 + 3 * i for i in range(len(names))]  # rows leave at different steps
    with engine:
        jobs = [_collect(engine, n, p, Sampling(max_tokens=m))
                for n, p, m in zip(names, prompts, lengths, strict=True)]
        got = [_drain(events) for _, events in jobs]
    # they really shared decode steps, with different adapters in one step
    assert engine.scheduler.max_rows_seen >= 3 and engine.scheduler.mixed_steps > 0
    for name, prompt, n, (tokens, finish) in zip(names, prompts, lengths, got, strict=True):
        expected = _alone_tokens(reference, engine, name, prompt, n)
        assert tokens == expected, name
        assert finish == ("stop" if expected[-1] in engine.stop_ids else "length")


def test_a_request_joining_a_running_batch_matches_alone(tiny_chat_model_dir, adapters,
                                                         reference):
    engine = Engine(str(tiny_chat_model_dir), adapters, base_name="base", precision="fp32",
                    prefill_chunk=4)
    long_prompt = engine.encode_chat([{"role": "user", "content": "a long question " * 6}])
    short = engine.encode_chat([{"role": "user", "content": "hi"}])
    with engine:
        first = _collect(engine, "alpha", short, Sampling(max_tokens=40))
        head = first[1].get(timeout=60).tokens  # it is decoding now
        steps = engine.scheduler.steps
        late = _collect(engine, "beta", long_prompt, Sampling(max_tokens=10))
        late_tokens, _ = _drain(late[1])
        first_tokens, _ = _drain(first[1])
    assert steps < engine.scheduler.steps
    assert late_tokens == _alone_tokens(reference, engine, "beta", long_prompt, 10)
    assert head + first_tokens == _alone_tokens(reference, engine, "alpha", short, 40)


def test_shared_prompt_prefixes_are_reused_with_the_same_tokens(tiny_chat_model_dir, adapters,
                                                                  reference):
    engine = Engine(str(tiny_chat_model_dir), adapters, base_name="base", precision="fp32",
                    prefill_chunk=5)
    system = {"role": "system", "content": "You are a careful assistant who answers briefly."}
    asks = [("alpha", "capital of the sea?"), ("alpha", "capital of the sky?"),
            ("beta", "capital of the sea?"), ("beta", "name a colour"), ("alpha", "a colour?")]
    prompts = [engine.encode_chat([system, {"role": "user", "content": q}]) for _, q in asks]
    with engine:
        got = [_drain(_collect(engine, name, p, Sampling(max_tokens=10))[1])[0]
               for (name, _), p in zip(asks, prompts, strict=True)]
        stats = engine.scheduler.stats()
    # the 2nd alpha prompt stores what it shares with the 1st, the 3rd reuses the system part
    # of it; beta's 2nd prompt stores beta's own (adapters change the KV: never shared)
    assert stats["prefix_hits"] == 1 and stats["prefix_tokens_reused"] >= 10
    for (name, _), prompt, tokens in zip(asks, prompts, got, strict=True):
        assert tokens == _alone_tokens(reference, engine, name, prompt, 10)


def test_a_reused_prefix_holds_the_kv_of_prefilling_it(tiny_chat_model_dir):
    model, _ = load_model(str(tiny_chat_model_dir))
    model.eval()

    def prefill(ids: list[int], past=None, start: int = 0):
        cache = DynamicCache(past) if past else DynamicCache()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids[start:]]),
                           position_ids=torch.arange(start, len(ids))[None], cache=cache,
                           use_cache=True).logits[0, -1]
        return logits, cache_layers(cache)

    torch.manual_seed(0)
    a = torch.randint(3, 400, (20,)).tolist()
    b = a[:12] + torch.randint(3, 400, (8,)).tolist()
    c = a[:10] + torch.randint(3, 400, (6,)).tolist()
    prefixes = PrefixCache(min_tokens=4)
    for ids in (a, b):
        prefixes.remember(None, ids, prefill(ids)[1])
    assert prefixes.lookup("other", c) is None  # another adapter's KV is never reused
    length, past = prefixes.lookup(None, c)
    assert length == 10  # the stored 12-token prefix of a and b, as far as c shares it
    full_logits, full = prefill(c)
    for (k, v), (fk, fv) in zip(past, full, strict=True):
        torch.testing.assert_close(k, fk[:, :, :10])
        torch.testing.assert_close(v, fv[:, :, :10])
    torch.testing.assert_close(prefill(c, past, start=10)[0], full_logits)


def _slow(engine: Engine, seconds: float):
    """Every forward of the engine's model takes at least ``seconds`` (a busy machine)."""
    return engine.model.register_forward_pre_hook(lambda *_: time.sleep(seconds))


def _settles(engine: Engine, **expected: int) -> bool:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = engine.scheduler.stats()
        if all(stats[k] == v for k, v in expected.items()):
            return True
        time.sleep(0.01)
    return False


def test_cancel_timeout_and_queue_limit(tiny_chat_model_dir):
    engine = Engine(str(tiny_chat_model_dir), base_name="base", precision="fp32",
                    max_batch=1, max_queue=1,
                    max_tokens_limit=64, request_timeout=30)
    _slow(engine, 0.02)
    ids = engine.encode_chat([{"role": "user", "content": "hi"}])
    with engine:
        job, events = _collect(engine, "base", ids, Sampling(max_tokens=64))
        events.get(timeout=60)  # running (the batch holds one row)
        waiting = _collect(engine, "base", ids, Sampling(max_tokens=64))
        with pytest.raises(RequestError) as full:
            _collect(engine, "base", ids, Sampling(max_tokens=64))
        assert full.value.status == 429
        job.cancel()
        waiting[1].get(timeout=60)  # the cancelled row left; the waiting one runs
        assert _settles(engine, running=1, waiting=0)
        waiting[0].cancel()
        engine.request_timeout = 0.1
        _, late = _collect(engine, "base", ids, Sampling(max_tokens=64))
        with pytest.raises(JobTimeout):
            _drain(late)
        assert _settles(engine, running=0, waiting=0)
    with pytest.raises(RequestError) as stopped:
        _collect(engine, "base", ids, Sampling(max_tokens=4))
    assert stopped.value.status == 503


@pytest.mark.parametrize("packed", [True, False])
def test_weights_are_packed_while_serving_and_restored_after(tiny_chat_model_dir, adapters,
                                                             reference, packed):
    """Every linear layer, the LoRA layers' base layers included, runs packed while the loop
    runs (the greedy tokens stay those of the unpacked model alone); stopping restores the
    model's own modules; ``packed_weights=False`` leaves them alone."""
    from torch import nn

    from peftlab.runtime.packed_linear import PackedLinear

    engine = Engine(str(tiny_chat_model_dir), adapters, base_name="base", precision="fp32",
                    packed_weights=packed)
    linears = sum(type(m) is nn.Linear for m in engine.model.modules())
    prompt = engine.encode_chat([{"role": "user", "content": "pack me"}])
    with engine:
        tokens, _ = _drain(_collect(engine, "beta", prompt, Sampling(max_tokens=12))[1])
        running = sum(isinstance(m, PackedLinear) for m in engine.model.modules())
        stats = engine.scheduler.stats()
    assert tokens == _alone_tokens(reference, engine, "beta", prompt, 12)
    assert running == stats["packed_layers"] == (linears if packed else 0)
    assert not any(isinstance(m, PackedLinear) for m in engine.model.modules())
    assert sum(type(m) is nn.Linear for m in engine.model.modules()) == linears


def test_sampling_follows_the_seed(tiny_chat_model_dir):
    with Engine(str(tiny_chat_model_dir), base_name="base", precision="fp32") as engine:
        ids = engine.encode_text("capital of")
        runs = [engine.complete("base", ids, Sampling(max_tokens=12, temperature=1.0, seed=s))
                for s in (5, 5, 6)]
        greedy = engine.complete("base", ids, Sampling(max_tokens=12))
    assert runs[0].text == runs[1].text
    assert len({runs[0].text, runs[2].text, greedy.text}) == 3


class _Chars:
    """A tokenizer whose tokens are characters; ids 0..: chr(id); 1000: an incomplete byte."""

    def decode(self, ids, skip_special_tokens=True):
        text = "".join(chr(i) for i in ids if i != 1000)
        return text + ("\ufffd" if ids and ids[-1] == 1000 else "")


def _feed(stream: TextStream, text: str) -> list[str]:
    return [stream.feed([ord(c)]) for c in text]


def test_text_stream_holds_back_stop_prefixes_and_partial_characters():
    stream = TextStream(_Chars(), stop=["END", "##"])
    pieces = _feed(stream, "abEN#x")
    assert pieces == ["a", "b", "", "", "EN", "#x"]  # "EN" could have become "END"
    assert not stream.stopped
    pieces += _feed(stream, "yEN") + _feed(stream, "D and more")
    assert stream.stopped and stream.text == "abEN#xy"
    assert "".join(pieces) == stream.text
    assert stream.feed([ord("z")]) == "" and stream.finish() == ""
    plain = TextStream(_Chars())
    assert plain.feed([ord("a"), 1000]) == "a"  # the incomplete character waits
    assert plain.feed([ord("b")]) == "b" and plain.finish() == "" and plain.text == "ab"
