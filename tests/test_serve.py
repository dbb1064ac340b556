"""OpenAI-compatible serving: one tiny base model and two LoRA adapters behind HTTP. Every
answer must equal what the same model + adapter generates directly; switching adapters
between requests must not leak; sampling parameters are applied and a seed reproduces an
answer; bad requests get OpenAI-shaped 4xx errors; stop sequences cut the answer; model names
and error messages never show local paths.

The model is conftest's diverse tiny model: the plain tiny one answers ``''`` to everything."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from peftlab.cli import main
from peftlab.evaluation.generate import generate_replies, greedy_generate, stop_token_ids
from peftlab.methods.lora import LoraConfig, apply_lora, load_lora, save_lora
from peftlab.models import load_model
from peftlab.runtime.precision import prepare_inference
from peftlab.serve.engine import Engine, Sampling
from peftlab.serve.server import make_app
from tests.live_server import live_server

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "capital of x?"}]


@pytest.fixture(scope="module")
def tiny_chat_model_dir(diverse_chat_model_dir) -> Path:
    """Every test here runs on the diverse tiny model (varied, non-empty answers)."""
    return diverse_chat_model_dir


@pytest.fixture(scope="module")
def adapters(tiny_chat_model_dir, tmp_path_factory) -> dict[str, Path]:
    out = {}
    for seed, name in ((1, "alpha"), (2, "beta")):
        model, _ = load_model(str(tiny_chat_model_dir))
        torch.manual_seed(seed)
        targets = ["q_proj", "v_proj"] if name == "alpha" else ["gate_proj", "down_proj"]
        apply_lora(model, LoraConfig(r=4, alpha=16, init="random", target_modules=targets))
        out[name] = tmp_path_factory.mktemp(name)
        save_lora(model, out[name], base_model_name_or_path=str(tiny_chat_model_dir))
    return out


@pytest.fixture(scope="module")
def engine(tiny_chat_model_dir, adapters):
    # bf16 weights (what `precision: auto` picks where bf16 matmuls are fast); the answers are
    # compared with the same model cast the same way (`_direct`)
    return Engine(str(tiny_chat_model_dir), adapters, base_name="base", max_tokens_limit=64,
                  precision="bf16")


@pytest.fixture(scope="module")
def server(engine):
    with live_server(make_app(engine, loopback_only=True)) as url:
        yield url


def _post(url: str, payload, raw: bytes | None = None) -> tuple[int, dict | str]:
    data = raw if raw is not None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            body = r.read().decode()
            ctype = r.headers["Content-Type"]
            return r.status, json.loads(body) if ctype == "application/json" else body
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode())


def _direct(model_dir: Path, adapter: Path | None, max_new: int) -> str:
    model, tok = load_model(str(model_dir))
    if adapter is not None:
        load_lora(model, adapter)
    prepare_inference(model, "bf16")
    return generate_replies(model, tok, [CHAT], max_new_tokens=max_new, batch_size=1)[0]


def test_engine_holds_bf16_weights_and_adapter_stacks(engine):
    assert engine.precision == "bf16"
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    stacks = [m._stacked for m in engine.model.modules() if getattr(m, "_stacked", None)]
    assert stacks and all(s.a.dtype == s.b_t.dtype == torch.bfloat16 for s in stacks)


def test_models_lists_base_and_adapters(server):
    with urllib.request.urlopen(f"{server}/v1/models") as r:
        data = json.loads(r.read())
    assert data["object"] == "list" and [m["id"] for m in data["data"]] == ["base", "alpha", "beta"]


def test_each_model_name_answers_like_the_model_itself(server, tiny_chat_model_dir, adapters):
    answers = {}
    for name in ("alpha", "base", "beta", "alpha"):  # switching back and forth must not leak
        status, r = _post(f"{server}/v1/chat/completions",
                          {"model": name, "messages": CHAT, "max_tokens": 8, "temperature": 0})
        assert status == 200, r
        assert r["object"] == "chat.completion" and r["model"] == name
        choice = r["choices"][0]
        assert choice["message"]["role"] == "assistant"
        if name in answers:
            assert choice["message"]["content"] == answers[name]
        answers[name] = choice["message"]["content"]
        assert r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + r["usage"][
            "completion_tokens"]
        if choice["finish_reason"] == "length":
            assert r["usage"]["completion_tokens"] == 8
    assert answers["base"] == _direct(tiny_chat_model_dir, None, 8)
    for name, path in adapters.items():
        assert answers[name] == _direct(tiny_chat_model_dir, path, 8)
    assert len(set(answers.values())) == 3  # the adapters really change the model


def test_stream_sends_the_same_answer_in_pieces(server):
    payload = {"model": "beta", "messages": CHAT, "max_tokens": 8}
    _, whole = _post(f"{server}/v1/chat/completions", payload)
    status, body = _post(f"{server}/v1/chat/completions", dict(payload, stream=True))
    assert status == 200
    events = [line[len("data: "):] for line in body.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"]
               for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    # A non-streamed chat answer is stripped at both ends, a streamed one only at the start
    # (a stream cannot know which whitespace is trailing): here the answer ends in '\x1c'.
    assert text and text.rstrip() == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == whole["usage"]


def test_text_completions(server, tiny_chat_model_dir, adapters):
    status, r = _post(f"{server}/v1/completions",
                      {"model": "alpha", "prompt": "The capital of", "max_tokens": 5})
    assert status == 200 and r["object"] == "text_completion"
    model, tok = load_model(str(tiny_chat_model_dir))
    ids = tok("The capital of")["input_ids"]
    assert r["usage"]["prompt_tokens"] == len(ids)
    # the same continuation, computed directly: the alpha adapter, greedy, cut at a stop token
    load_lora(model, adapters["alpha"])
    prepare_inference(model, "bf16")
    stops = stop_token_ids(tok)
    new_ids = greedy_generate(model.eval(), [ids], 5, stops, tok.pad_token_id)[0]
    expected = tok.decode([t for t in new_ids if t not in stops], skip_special_tokens=True)
    assert expected and r["choices"][0]["text"] == expected
    status, streamed = _post(f"{server}/v1/completions",
                             {"model": "alpha", "prompt": "The capital of", "max_tokens": 5,
                              "stream": True})
    pieces = [json.loads(line[6:]) for line in streamed.splitlines()
              if line.startswith("data: {")]
    assert "".join(p["choices"][0]["text"] for p in pieces) == r["choices"][0]["text"]


def test_sampling_parameters_are_applied_and_seeded(server, tiny_chat_model_dir, adapters):
    """temperature/top_p change what is sampled, and a seed makes it reproducible. Each
    assertion is deterministic (fixed seeds on CPU); the limits are exact: top_p -> 0 keeps
    only the most likely token, temperature -> 0 puts all the mass on it (= greedy)."""
    with Engine(str(tiny_chat_model_dir), {"alpha": adapters["alpha"]},
                base_name="base") as engine:
        ids = engine.encode_chat(CHAT)

        def text(**kw) -> str:
            return engine.complete("alpha", ids, Sampling(max_tokens=8, **kw)).text

        greedy = text()
        assert greedy
        free = {seed: text(temperature=1.0, top_p=1.0, seed=seed) for seed in range(4)}
        assert free[0] == text(temperature=1.0, top_p=1.0, seed=0)  # the seed reproduces it
        assert len(set(free.values())) > 1 and greedy not in free.values()  # really sampled
        for seed in range(4):  # the same seeds, with the distribution squeezed onto the argmax
            assert text(temperature=1.0, top_p=1e-6, seed=seed) == greedy
            assert text(temperature=1e-4, top_p=1.0, seed=seed) == greedy

    # over HTTP the request's own seed/temperature/top_p reach the engine
    payload = {"model": "alpha", "messages": CHAT, "max_tokens": 8, "temperature": 1.0,
               "top_p": 1.0, "seed": 2}
    answers = [_post(f"{server}/v1/chat/completions", payload)[1]["choices"][0]["message"]
               ["content"] for _ in range(2)]
    assert answers == [free[2].strip(), free[2].strip()]
    _, squeezed = _post(f"{server}/v1/chat/completions", dict(payload, top_p=1e-6))
    assert squeezed["choices"][0]["message"]["content"] == greedy.strip()


@pytest.mark.parametrize(("payload", "status", "param"), [
    ({"model": "gamma", "messages": CHAT}, 404, "model"),
    ({"messages": CHAT}, 400, "model"),
    ({"model": "base"}, 400, "messages"),
    ({"model": "base", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ({"model": "base", "messages": CHAT, "max_tokens": 65}, 400, "max_tokens"),
    ({"model": "base", "messages": CHAT, "temperature": 3}, 400, "temperature"),
    ({"model": "base", "messages": CHAT, "n": 2}, 400, "n"),
    ({"model": "base", "messages": CHAT, "max_tokens": 999, "stream": True}, 400, "max_tokens"),
    ({"model": "base", "messages": CHAT, "max_tokens": "8"}, 400, "max_tokens"),
    ({"model": "base", "messages": CHAT, "top_k": 5}, 400, "top_k"),
    ({"model": "base", "messages": CHAT, "logprobs": True}, 400, "logprobs"),
    ({"model": "base", "messages": CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "base", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "messages[0].content"),
])
def test_bad_requests_get_openai_errors(server, payload, status, param):
    got, r = _post(f"{server}/v1/chat/completions", payload)
    assert got == status and r["error"]["param"] == param and r["error"]["message"]


def test_malformed_body_and_unknown_route(server):
    status, r = _post(f"{server}/v1/chat/completions", None, raw=b"{not json")
    assert status == 400 and "not valid JSON" in r["error"]["message"]
    status, r = _post(f"{server}/v1/chat/completions", ["a list"])
    assert status == 400 and "JSON object" in r["error"]["message"]
    status, r = _post(f"{server}/v1/embeddings", {"model": "base"})
    assert status == 404 and "no route" in r["error"]["message"]


def test_stop_sequences_cut_the_answer(server):
    payload = {"model": "alpha", "messages": CHAT, "max_tokens": 12}
    _, whole = _post(f"{server}/v1/chat/completions", payload)
    text = whole["choices"][0]["message"]["content"]
    assert len(text) > 4, text
    stop = text[3:5]  # cut inside the answer: what came before it is the reply
    status, cut = _post(f"{server}/v1/chat/completions", dict(payload, stop=[stop, "never"]))
    assert status == 200
    assert cut["choices"][0]["message"]["content"] == text[:text.index(stop)].strip()
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["usage"]["completion_tokens"] < whole["usage"]["completion_tokens"]
    _, body = _post(f"{server}/v1/chat/completions", dict(payload, stop=stop, stream=True))
    chunks = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == cut["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_names_and_errors_never_show_local_paths(tiny_chat_model_dir, adapters):
    engine = Engine(str(tiny_chat_model_dir), {"alpha": adapters["alpha"]})
    assert engine.model_ids() == [tiny_chat_model_dir.name, "alpha"]

    def broken(messages):
        raise RuntimeError(f"cannot read {tiny_chat_model_dir}/secret.json")

    engine.encode_chat = broken  # an unexpected failure inside the server
    with live_server(make_app(engine)) as url:
        with urllib.request.urlopen(f"{url}/v1/models") as r:
            listed = r.read().decode()
        status, missing = _post(f"{url}/v1/chat/completions", {"model": "gamma", "messages": CHAT})
        failed, internal = _post(f"{url}/v1/chat/completions", {"model": "alpha", "messages": CHAT})
    assert status == 404 and failed == 500
    assert internal["error"]["type"] == "server_error"
    for text in (listed, json.dumps(missing), json.dumps(internal)):
        assert str(tiny_chat_model_dir.parent) not in text and "secret" not in text


def test_engine_refuses_what_it_cannot_switch(tiny_chat_model_dir, adapters, tmp_path):
    with pytest.raises(ValueError, match="base model's name"):
        Engine(str(tiny_chat_model_dir), {"base": adapters["alpha"]}, base_name="base")
    model, _ = load_model(str(tiny_chat_model_dir))
    apply_lora(model, LoraConfig(r=2, modules_to_save=["lm_head"]))
    save_lora(model, tmp_path / "with-head")
    with pytest.raises(ValueError, match="modules_to_save"):
        Engine(str(tiny_chat_model_dir), {"x": tmp_path / "with-head"})
    model, _ = load_model(str(tiny_chat_model_dir))
    apply_lora(model, LoraConfig(r=2, use_dora=True))
    save_lora(model, tmp_path / "dora")
    with pytest.raises(ValueError, match="DoRA"):
        Engine(str(tiny_chat_model_dir), {"x": tmp_path / "dora"})


def test_serve_cli_rejects_a_bad_adapter_spec(capsys):
    assert main(["serve", "--model", "x", "--adapter", "no-equals-sign"]) == 2
    assert "expected NAME=DIR" in capsys.readouterr().err
