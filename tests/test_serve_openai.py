"""The official ``openai`` Python client against ``peftlab serve`` on 127.0.0.1: chat,
completions and streaming through the client's own parsing, concurrent requests for
different adapters, errors raised as the client's exception types, and the API key."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from peftlab.methods.lora import LoraConfig, apply_lora, save_lora
from peftlab.models import load_model
from peftlab.serve.engine import Engine, Sampling
from peftlab.serve.server import make_app
from tests.live_server import live_server

openai = pytest.importorskip("openai", reason="the openai client is in the test extra")

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "capital of x?"}]


@pytest.fixture(scope="module")
def adapter(tiny_chat_model_dir, tmp_path_factory) -> Path:
    model, _ = load_model(str(tiny_chat_model_dir))
    torch.manual_seed(7)
    apply_lora(model, LoraConfig(r=4, alpha=16, init="random"))
    out = tmp_path_factory.mktemp("facts")
    save_lora(model, out)
    return out


@pytest.fixture(scope="module")
def served(tiny_chat_model_dir, adapter):
    engine = Engine(str(tiny_chat_model_dir), {"facts": adapter}, base_name="base",
                    max_tokens_limit=64)
    with live_server(make_app(engine, api_key="k-test")) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k-test", max_retries=0,
                               timeout=60)
        yield engine, client, url


def test_models_and_chat(served):
    engine, client, _ = served
    assert [m.id for m in client.models.list()] == ["base", "facts"]
    assert client.models.retrieve("facts").id == "facts"
    r = client.chat.completions.create(model="facts", messages=CHAT, max_tokens=8,
                                       temperature=0)
    direct = engine.complete("facts", engine.encode_chat(CHAT), Sampling(max_tokens=8))
    assert r.object == "chat.completion" and r.model == "facts"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == direct.text.strip()
    assert r.choices[0].finish_reason == direct.finish_reason
    assert r.usage.completion_tokens == direct.completion_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_chat_adds_up_to_the_whole_answer(served):
    _, client, _ = served
    whole = client.chat.completions.create(model="base", messages=CHAT, max_tokens=10)
    pieces, finish, usage = [], None, None
    with client.chat.completions.create(model="base", messages=CHAT, max_tokens=10, stream=True,
                                        stream_options={"include_usage": True}) as stream:
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                pieces.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_text_completions_plain_and_streamed(served):
    _, client, _ = served
    r = client.completions.create(model="facts", prompt="The capital of", max_tokens=6)
    assert r.object == "text_completion" and isinstance(r.choices[0].text, str)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="facts", prompt="The capital of", max_tokens=6, stream=True) if c.choices)
    assert streamed == r.choices[0].text


def test_concurrent_clients_for_two_models_get_their_own_answers(served):
    _, client, _ = served

    def ask(model: str) -> str:
        r = client.chat.completions.create(model=model, messages=CHAT, max_tokens=12)
        return r.choices[0].message.content

    alone = {m: ask(m) for m in ("base", "facts")}
    assert alone["base"] != alone["facts"]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, ["base", "facts"] * 4))
    assert together == [alone["base"], alone["facts"]] * 4


def test_errors_arrive_as_the_clients_exceptions(served):
    _, client, url = served
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=CHAT)
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="base", messages=CHAT, n=2)
    assert bad.value.body["param"] == "n"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
