"""``peftlab serve --classifier``: ``POST /v1/classify`` decides as ``peftlab predict`` does
(by the saved threshold), next to a chat model or alone; bad requests are clear 4xx."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from peftlab.api import predict
from peftlab.cli import main
from peftlab.serve.classify import Classifiers
from peftlab.serve.engine import Engine
from peftlab.serve.schemas import MAX_CLASSIFY_INPUTS
from peftlab.serve.server import make_app
from tests.live_server import live_server
from tests.test_classification import tiny_bert_dir  # noqa: F401
from tests.test_decision_threshold import threshold_run  # noqa: F401


def _post(url: str, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _get(url: str, path: str) -> dict:
    with urllib.request.urlopen(url + path, timeout=60) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def classifier(threshold_run):  # noqa: F811
    _, summary, val_path = threshold_run
    return summary.adapter_dir, val_path


def test_classify_answers_what_predict_answers_with_the_saved_threshold(classifier):
    adapter, val_path = classifier
    expected = predict(adapter, val_path)
    assert expected["threshold"] is not None
    texts = [json.loads(x)["text"] for x in val_path.read_text().splitlines()]
    with live_server(make_app(None, classifiers=Classifiers({"unfair": adapter}))) as url:
        status, body = _post(url, "/v1/classify", {"model": "unfair", "input": texts})
        assert status == 200, body
        one = _post(url, "/v1/classify", {"model": "unfair", "input": texts[3]})[1]
        assert [m["id"] for m in _get(url, "/v1/models")["data"]] == ["unfair"]
        assert _get(url, "/health")["status"] == "ok"
    assert body["threshold"] == pytest.approx(expected["threshold"])
    assert [d["label"] for d in body["data"]] == [p["prediction"] for p in expected["predictions"]]
    for got, want in zip(body["data"], expected["predictions"], strict=True):
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=2e-6)
    # the threshold decides, not the likelier class (rows where the two disagree exist)
    assert all((d["label"] == "pos") == (d["probabilities"]["pos"] >= body["threshold"])
               for d in body["data"])
    assert any((d["label"] == "pos") != (d["probabilities"]["pos"] > 0.5) for d in body["data"])
    assert one["data"][0] == {**body["data"][3], "index": 0}
    assert body["truncated"] == 0


def test_classifiers_next_to_a_chat_model_and_clear_errors(classifier, tiny_chat_model_dir):
    adapter, _ = classifier
    engine = Engine(str(tiny_chat_model_dir), base_name="base", max_tokens_limit=16)
    app = make_app(engine, classifiers=Classifiers({"unfair": adapter}))
    with live_server(app) as url:
        assert [m["id"] for m in _get(url, "/v1/models")["data"]] == ["base", "unfair"]
        status, body = _post(url, "/v1/chat/completions", {
            "model": "unfair", "messages": [{"role": "user", "content": "hi"}]})
        assert status == 400 and "POST /v1/classify" in body["error"]["message"]
        status, body = _post(url, "/v1/classify", {"model": "base", "input": "hi"})
        assert status == 400 and "generates text" in body["error"]["message"]
        status, body = _post(url, "/v1/classify", {"model": "nope", "input": "hi"})
        assert status == 404 and body["error"]["code"] == "model_not_found"
        cases = [({"input": []}, "input", "at least one text"),
                 ({"input": ["fine", "  "]}, "input", "text 1 is empty"),
                 ({"input": ["x"] * (MAX_CLASSIFY_INPUTS + 1)}, "input", "at most"),
                 ({"input": "a", "text_pair": "b"}, "text_pair", "single texts"),
                 ({"input": "a", "top_k": 3}, "top_k", "unrecognized")]
        for extra, param, message in cases:
            status, body = _post(url, "/v1/classify", {"model": "unfair", **extra})
            assert status == 400, (extra, body)
            assert body["error"]["param"] == param and message in body["error"]["message"]
        status, body = _post(url, "/v1/chat/completions", {  # the chat model still answers
            "model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert status == 200 and body["choices"][0]["finish_reason"] in ("length", "stop")


@pytest.mark.parametrize("argv, message", [
    ([], "needs --model"),
    (["--adapter", "a=x", "--classifier", "c=y"], "--adapter needs --model"),
    (["--classifier", "c=y", "--classifier", "c=z"], "given twice"),
    (["--classifier", "c"], "expected NAME=DIR"),
])
def test_serve_flags_are_checked_before_anything_loads(argv, message, capsys):
    assert main(["serve", *argv]) != 0
    assert message in capsys.readouterr().err


def test_make_app_refuses_to_serve_nothing():
    with pytest.raises(ValueError, match="nothing to serve"):
        make_app(None)
