"""Continued pre-training (task: pretrain) and chained runs (init_from).

Masking statistics and label positions, causal blocks whose packed loss equals the loss of
each piece run alone, documents held out whole, MLM loss parity with transformers, and a
chained run that really starts from the earlier run's adapted weights.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from torch.testing import assert_close
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertModel,
)

import peftlab
from peftlab.cli import main
from peftlab.config import ConfigError, from_dict
from peftlab.data.collate import IGNORE_INDEX, pad_collate
from peftlab.data.documents import (
    Document,
    causal_blocks,
    masked_blocks,
    read_documents,
    tokenize_documents,
)
from peftlab.data.masking import mask_tokens
from peftlab.data.readers import DataError, read_text_documents
from peftlab.methods.chain import INIT_FILE, init_chain, merge_chain
from peftlab.models import load_model
from peftlab.models.lm import masked_lm_loss
from peftlab.tasks.pretrain.data import prepare_pretrain_data
from peftlab.tasks.pretrain.task import (
    MLM_HEAD_FILE,
    CausalPretrainTask,
    MaskedPretrainTask,
    build_pretrain_task,
)
from peftlab.training.recipe import run_training
from tests.test_classification import _minilm_dir

WORDS = ("the user agrees that we may terminate suspend or change the service at any time "
         "without notice liability arbitration court law data account content").split()


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer random BERT saved *without* an MLM head (like the embedded MiniLM), with
    MiniLM's WordPiece tokenizer (real sub-word continuations for whole-word masking)."""
    tok = AutoTokenizer.from_pretrained(_minilm_dir())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        pad_token_id=tok.pad_token_id, initializer_range=0.1)
    directory = tmp_path_factory.mktemp("tiny-bert-mlm")
    BertModel(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def _cfg(model_dir, data_file, out, **sections) -> dict:
    cfg = {"model": str(model_dir), "task": "pretrain", "method": {"name": "lora", "r": 4},
           "data": {"train": str(data_file), "validation_split": 0.25},
           "train": {"epochs": 1, "batch_size": 4, "lr": 1e-2, "max_length": 32,
                     "precision": "fp32", "log_every": 1, "warmup_ratio": 0.0},
           "output_dir": str(out)}
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


def _doc_file(tmp_path: Path, n_docs: int = 12, seed: int = 0) -> Path:
    """Rows of sentences grouped into documents by ``doc`` (as CLAUDETTE is)."""
    rng = random.Random(seed)
    rows = [{"doc": f"d{d}", "text": _text(rng, rng.randint(4, 12))}
            for d in range(n_docs) for _ in range(rng.randint(2, 5))]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- masking


def test_mask_tokens_statistics_and_label_positions():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 30000, (64, 512), generator=g)
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, 0] = maskable[:, -1] = False  # CLS / SEP
    maskable[::4, 400:] = False  # padding of some rows
    masked, labels = mask_tokens(ids, maskable, 0.15, mask_id=4, vocab_size=30522,
                                 generator=torch.Generator().manual_seed(1))
    selected = labels != IGNORE_INDEX
    assert not selected[~maskable].any()  # specials and padding are never targets
    assert torch.equal(labels[selected], ids[selected])  # a target is the original token
    assert torch.equal(masked[~selected], ids[~selected])  # only targets are changed
    share = selected.sum() / maskable.sum()
    assert abs(float(share) - 0.15) < 0.005
    n = int(selected.sum())
    as_mask = int((masked[selected] == 4).sum())
    unchanged = int((masked[selected] == ids[selected]).sum())
    replaced = n - as_mask - unchanged
    assert abs(as_mask / n - 0.8) < 0.01
    assert abs(replaced / n - 0.1) < 0.01
    assert abs(unchanged / n - 0.1) < 0.01


def test_whole_word_masking_takes_words_whole():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 30000, (32, 256), generator=g)
    starts = torch.rand(ids.shape, generator=g) < 0.4  # words of 1..n sub-word tokens
    starts[:, 0] = True
    maskable = torch.ones_like(starts)
    maskable[:, 0] = False
    starts[:, 1] = True  # the special token is a word of its own
    _, labels = mask_tokens(ids, maskable, 0.15, mask_id=4, vocab_size=30522, word_starts=starts,
                            generator=torch.Generator().manual_seed(3))
    selected = labels != IGNORE_INDEX
    word = torch.cumsum(starts.long(), dim=1)
    words_selected, words_total = 0, 0
    for r in range(ids.shape[0]):
        for w in word[r, 1:].unique():
            member = selected[r][(word[r] == w) & maskable[r]]
            assert member.all() or not member.any()  # never half a word
            words_selected += int(member.all())
            words_total += 1
    assert abs(words_selected / words_total - 0.15) < 0.02


def test_every_row_gets_a_target():
    ids = torch.arange(10, 18).repeat(50, 1)
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, 0] = False
    _, labels = mask_tokens(ids, maskable, 0.01, 4, 100, generator=torch.Generator().manual_seed(0))
    assert ((labels != IGNORE_INDEX).sum(dim=1) >= 1).all()
    assert (labels[:, 0] == IGNORE_INDEX).all()


def test_masked_blocks_layout_and_collate_labels(tiny_bert_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    rng = random.Random(0)
    docs = [Document(f"x:{i}", _text(rng, rng.randint(3, 30)) + " unbelievably")
            for i in range(6)]
    tokens = tokenize_documents(docs, tok, word_starts=True)
    rows = masked_blocks(tokens, 16, tok.cls_token_id, tok.sep_token_id)
    stream = [t for d in tokens for t in d["ids"] + [tok.sep_token_id]]
    inner = []
    for row in rows:
        assert len(row["input_ids"]) <= 16
        assert row["input_ids"][0] == tok.cls_token_id and row["input_ids"][-1] == tok.sep_token_id
        assert row["special"][0] == row["special"][-1] == 1
        for t, s in zip(row["input_ids"], row["special"], strict=True):
            assert s == (t in (tok.cls_token_id, tok.sep_token_id))
        inner += row["input_ids"][1:-1]
    assert inner == stream  # every token, in order, nothing dropped
    # "unbelievably" is several WordPiece tokens: only the first starts a word.
    piece = tok("unbelievably", add_special_tokens=False)["input_ids"]
    assert len(piece) > 1 and tokens[0]["word_starts"][-len(piece):] == [True] + [False] * (
        len(piece) - 1)

    cfg = from_dict(_cfg(tiny_bert_dir, tmp_path / "x.txt", tmp_path / "o"))
    task = MaskedPretrainTask(cfg, tok)
    torch.manual_seed(0)
    batch = task.collate(rows)
    specials = torch.isin(batch["input_ids"].where(batch["labels"] == IGNORE_INDEX,
                                                   batch["labels"]),
                          torch.tensor([tok.cls_token_id, tok.sep_token_id, tok.pad_token_id]))
    assert not ((batch["labels"] != IGNORE_INDEX) & specials).any()
    assert task.count(batch) == int((batch["labels"] != IGNORE_INDEX).sum()) > 0


# ----------------------------------------------------------------------------- causal blocks


def _segments(row: dict) -> list[tuple[int, int]]:
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
    return list(zip(starts, starts[1:] + [len(row["input_ids"])], strict=True))


def test_causal_blocks_layout():
    rng = random.Random(0)
    docs = [[rng.randint(5, 400) for _ in range(rng.randint(1, 40))] for _ in range(15)]
    rows = causal_blocks(docs, 24, eos_id=2)
    assert [t for r in rows for t in r["input_ids"]] == [t for d in docs for t in d + [2]]
    assert all(len(r["input_ids"]) == 24 for r in rows[:-1]) and len(rows[-1]["input_ids"]) <= 24
    for row in rows:
        for s, e in _segments(row):
            assert row["position_ids"][s:e] == list(range(e - s))
            assert row["labels"][s] == IGNORE_INDEX  # nothing before it in its segment
            assert row["labels"][s + 1:e] == row["input_ids"][s + 1:e]
    plain = causal_blocks(docs, 24, eos_id=2, reset=False)
    assert all("position_ids" not in r and r["labels"] == r["input_ids"] for r in plain)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_block_loss_equals_segments_alone(tiny_chat_model_dir, attn):
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir, attn_implementation=attn)
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (5, 19, 3, 40, 7, 11, 2)]
    rows = causal_blocks(docs, 32, eos_id=1)
    task = CausalPretrainTask.__new__(CausalPretrainTask)  # the loss needs only pad and chunk
    task.pad_id, task.chunk_size = 0, 4096
    alone = [{"input_ids": r["input_ids"][s:e], "labels": r["input_ids"][s:e]}
             for r in rows for s, e in _segments(r) if e - s > 1]

    def run(batch):
        model.zero_grad()
        loss, n = task.loss(model, batch)
        loss.backward()
        return loss.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters()}

    ref_loss, ref_n, ref_grads = run(pad_collate(alone, 0))
    loss, n, grads = run(task.collate(rows))
    assert n == ref_n == sum(len(d) for d in docs) + len(docs) - sum(
        len(_segments(r)) for r in rows)
    assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
    for k in ref_grads:
        assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-5, msg=k)
    # The test can fail: one sequence per block (no reset) lets documents see each other.
    leaky = [{**r, "position_ids": list(range(len(r["input_ids"])))} for r in rows]
    assert abs(float(run(task.collate(leaky))[0]) - float(ref_loss)) > 1e-2


# ----------------------------------------------------------------------------- documents


def test_text_documents_by_line_and_paragraph(tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("first doc\n\n\nsecond doc\nthird doc\n")
    assert read_text_documents(lines, "line") == [(1, "first doc"), (4, "second doc"),
                                                  (5, "third doc")]
    assert read_text_documents(lines) == [(1, "first doc"), (4, "second doc\nthird doc")]
    flat = tmp_path / "flat.txt"
    flat.write_text("\none\ntwo\n\n")  # blank lines only at the ends: one document per line
    assert read_text_documents(flat) == [(2, "one"), (3, "two")]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(DataError, match="empty.txt: file is empty"):
        read_text_documents(empty)


def test_record_documents_grouped_and_bad_rows(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"doc": "a", "text": "one"}\n{"doc": "b", "text": "two"}\n'
                    '{"doc": "a", "text": "three"}\n{"doc": "b", "text": ""}\n')
    with pytest.raises(DataError, match=r"rows.jsonl:4: field 'text' must be a non-empty string"):
        read_documents(path, document_field="doc")
    docs, report = read_documents(path, document_field="doc", on_error="skip")
    assert [(d.where, d.text) for d in docs] == [(f"{path}:rows 1..3", "one\nthree"),
                                                 (f"{path}:2", "two")]
    assert report["rows_skipped"] == 1 and report["documents"] == 2
    with pytest.raises(DataError, match="document field .* only applies to record files"):
        read_documents(tmp_path / "x.txt", document_field="doc")


def test_parquet_documents_equal_jsonl(tmp_path):
    rows = [{"doc": "a", "text": "one"}, {"doc": "b", "text": "two"}, {"doc": "a", "text": "3"}]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    texts = {str(p): [d.text for d in read_documents(p, document_field="doc")[0]]
             for p in (jsonl, parquet)}
    assert texts[str(parquet)] == texts[str(jsonl)] == ["one\n3", "two"]
    assert [d.text for d in read_documents(parquet)[0]] == ["one", "two", "3"]  # a row each


def test_validation_split_holds_out_whole_documents(tiny_chat_model_dir, tmp_path):
    rows = [{"doc": f"d{d}", "text": f"marker{d} " + " ".join(["the user"] * 30)}
            for d in range(10) for _ in range(3)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    cfg = from_dict(_cfg(tiny_chat_model_dir, path, tmp_path / "o",
                         data={"validation_split": 0.3}, pretrain={"document_field": "doc"},
                         train={"max_length": 16}))
    train, val, report = prepare_pretrain_data(cfg, tok, "clm")
    assert report["train"]["documents"] == 7 and report["validation"]["documents"] == 3

    def markers(blocks):
        text = tok.decode([t for b in blocks for t in b["input_ids"]])
        return {w for w in text.split() if w.startswith("marker")}

    # Every document is cut into several blocks, yet no document is on both sides.
    assert len(markers(train)) == 7 and len(markers(val)) == 3
    assert not markers(train) & markers(val)
    assert len(val) > 3
    # Seeded: the same documents are held out again, different ones with another seed.
    again = prepare_pretrain_data(cfg, tok, "clm")[1]
    assert markers(again) == markers(val)
    cfg.train.seed = 7
    assert markers(prepare_pretrain_data(cfg, tok, "clm")[1]) != markers(val)


def test_replay_share_of_training_tokens(tiny_chat_model_dir, tmp_path):
    rng = random.Random(1)
    replay = tmp_path / "general.txt"
    replay.write_text("\n".join(f"river city {_text(rng, 10)}" for _ in range(50)))
    tok = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    cfg = from_dict(_cfg(tiny_chat_model_dir, _doc_file(tmp_path), tmp_path / "o",
                         data={"replay": str(replay), "replay_ratio": 0.25},
                         pretrain={"document_field": "doc"}))
    train, _, report = prepare_pretrain_data(cfg, tok, "clm")
    r = report["replay"]
    replay_tokens = sum(len(b["input_ids"]) for b in train if b.get("source") == "replay")
    assert replay_tokens == r["tokens"] + r["documents_used"]  # + one EOS per document
    assert 0.25 <= r["share_of_tokens"] < 0.3  # whole rows: at most one row over
    assert r["blocks"] == sum(b.get("source") == "replay" for b in train)


def test_bad_pretrain_options_fail_before_work(tiny_chat_model_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    train = _doc_file(tmp_path)
    with pytest.raises(ConfigError, match="data.packing does not apply to task: pretrain"):
        build_pretrain_task(from_dict(_cfg(tiny_chat_model_dir, train, tmp_path / "o",
                                           data={"packing": True})), tok)
    with pytest.raises(ConfigError, match="mlm needs a tokenizer with mask_token"):
        build_pretrain_task(from_dict(_cfg(tiny_chat_model_dir, train, tmp_path / "o",
                                           pretrain={"objective": "mlm"})), tok)
    with pytest.raises(ConfigError, match="reset_attention can't be used with method"):
        build_pretrain_task(from_dict({**_cfg(tiny_chat_model_dir, train, tmp_path / "o"),
                                       "method": {"name": "prompt_tuning"}}), tok)
    with pytest.raises(ConfigError, match="pretrain.mlm_probability must be in"):
        from_dict(_cfg(tiny_chat_model_dir, train, tmp_path / "o",
                       pretrain={"mlm_probability": 1.5}))
    with pytest.raises(ConfigError, match="eval.generate: only runs for task: sft"):
        peftlab.train(_cfg(tiny_chat_model_dir, train, tmp_path / "o",
                           eval={"generate": True}), progress=False)
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- MLM


def test_masked_lm_loss_matches_transformers(tiny_bert_dir):
    model, tok = load_model(str(tiny_bert_dir), kind="masked_lm")
    assert isinstance(model, BertForMaskedLM)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, [2, 7, 11]] = ids[:, [2, 7, 11]]
    ours = masked_lm_loss(model, ids, mask, labels)
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss * 9
    assert_close(ours, ref)


def test_mlm_pretrain_run_trains_and_saves_the_new_head(tiny_bert_dir, tmp_path):
    rng = random.Random(0)
    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(_text(rng, rng.randint(20, 40)) for _ in range(24)))
    cfg = _cfg(tiny_bert_dir, text, tmp_path / "mlm", train={"epochs": 3, "lr": 5e-2},
               pretrain={"whole_word_masking": True})
    summary = peftlab.train(cfg, progress=False)
    report = json.loads((tmp_path / "mlm" / "eval_pretrain.json").read_text())
    assert report["objective"] == "mlm"
    domain = report["domain"]
    assert domain["after"]["loss"] < domain["before"]["loss"] - 1.0  # the random head learnt
    adapter = summary.adapter_dir
    assert (adapter / MLM_HEAD_FILE).is_file()
    # peftlab eval reloads the adapter and the head: the same held-out loss as after training.
    results = peftlab.evaluate(cfg)
    assert results["adapter"]["val_loss"] == pytest.approx(domain["after"]["loss"], rel=1e-5)
    assert "masked-LM loss before and after" in (tmp_path / "mlm" / "report.md").read_text()


# ----------------------------------------------------------------------------- init_from


def test_chained_runs_start_from_the_adapted_weights(tiny_chat_model_dir, tmp_path):
    train = _doc_file(tmp_path)
    lora = {"name": "lora", "r": 4, "init": "random"}  # B != 0: every run changes the model
    base = str(tiny_chat_model_dir)
    peftlab.train({**_cfg(base, train, tmp_path / "a"), "method": lora}, progress=False)
    peftlab.train({**_cfg(base, train, tmp_path / "b"), "method": lora,
                   "init_from": str(tmp_path / "a")}, progress=False)
    chain = init_chain(tmp_path / "b", base)
    assert chain == [(tmp_path / "a" / "adapter").resolve(), (tmp_path / "b" / "adapter").resolve()]

    # The expected starting point of run c: base + a merged + b merged.
    expected, _ = peftlab.load(base, adapter=tmp_path / "b" / "adapter")
    expected = peftlab.merge(expected)
    plain, _ = peftlab.load(base)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(expected.state_dict()[key], plain.state_dict()[key])

    model, tok = load_model(base)
    cfg = {**_cfg(base, train, tmp_path / "c"), "method": {"name": "lora", "r": 4},
           "init_from": str(tmp_path / "b"), "train": {**_cfg(base, train, "x")["train"],
                                                       "max_steps": 1, "lr": 1e-30}}
    run_training(from_dict(cfg), progress=False, model=model, tokenizer=tok)  # keeps our model
    start = model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert_close(start, expected.state_dict()[key])

    recorded = json.loads((tmp_path / "c" / "adapter" / INIT_FILE).read_text())["chain"]
    assert [Path(e["adapter"]) for e in recorded] == chain
    # Loading run c's adapter rebuilds the chain first: the same logits as the trained model.
    loaded, _ = peftlab.load(base, adapter=tmp_path / "c" / "adapter")
    ids = torch.tensor([[5, 9, 30, 41, 7]])
    model.eval()
    with torch.no_grad():
        assert_close(loaded(ids).logits, model(ids).logits)


def test_init_from_classifier_after_mlm_pretraining(tiny_bert_dir, tmp_path):
    rng = random.Random(0)
    text = tmp_path / "docs.txt"
    text.write_text("\n".join(_text(rng, 20) for _ in range(12)))
    mlm = {**_cfg(tiny_bert_dir, text, tmp_path / "mlm"),
           "method": {"name": "lora", "r": 4, "init": "random"}}
    peftlab.train(mlm, progress=False)
    rows = [{"text": _text(rng, 6), "label": i % 2} for i in range(16)]
    data = tmp_path / "cls.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cls = {"model": str(tiny_bert_dir), "task": "classification", "init_from": str(tmp_path / "mlm"),
           "method": {"name": "lora", "r": 4}, "data": {"train": str(data)},
           "train": {"max_steps": 2, "batch_size": 8, "max_length": 32, "precision": "fp32"},
           "output_dir": str(tmp_path / "cls")}
    peftlab.train(cls, progress=False)
    # predict rebuilds the chain: the MLM run's LoRA merged into the encoder, then the classifier.
    model, _ = load_model(str(tiny_bert_dir), kind="sequence_classification", labels=["0", "1"])
    before = model.bert.encoder.layer[0].attention.self.query.weight.clone()
    merge_chain(model, init_chain(tmp_path / "mlm", str(tiny_bert_dir)))
    after = model.bert.encoder.layer[0].attention.self.query.weight
    assert not torch.equal(before, after)
    out = peftlab.predict(tmp_path / "cls" / "adapter", [rows[0]["text"]])
    assert out["rows"] == 1


def test_init_from_refuses_what_cannot_be_merged(tiny_chat_model_dir, diverse_chat_model_dir,
                                                 tmp_path):
    train = _doc_file(tmp_path)
    base = str(tiny_chat_model_dir)
    peftlab.train({**_cfg(base, train, tmp_path / "ad"), "method": {"name": "adapter"}},
                  progress=False)
    with pytest.raises(ConfigError, match=r"init_from: .*holds a adapter adapter, which cannot be "
                                          r"merged .*only ia3 and lora can"):
        peftlab.train({**_cfg(base, train, tmp_path / "x"), "init_from": str(tmp_path / "ad")},
                      progress=False)
    with pytest.raises(ConfigError, match="init_from: .*nowhere: no such run or adapter"):
        peftlab.train({**_cfg(base, train, tmp_path / "x"),
                       "init_from": str(tmp_path / "nowhere")}, progress=False)
    peftlab.train(_cfg(base, train, tmp_path / "ok"), progress=False)
    with pytest.raises(ConfigError, match="was trained on model .* but this run's model is"):
        peftlab.train({**_cfg(diverse_chat_model_dir, train, tmp_path / "x"),
                       "init_from": str(tmp_path / "ok")}, progress=False)
    assert not (tmp_path / "x").exists()


def test_cli_bad_init_from_is_one_line(tiny_chat_model_dir, tmp_path, capsys):
    cfg = {**_cfg(tiny_chat_model_dir, _doc_file(tmp_path), tmp_path / "x"),
           "init_from": str(tmp_path / "nowhere")}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("peftlab train: error: init_from: ") and "\n" not in err, err
    assert "no such run or adapter directory" in err
    assert not (tmp_path / "x").exists()
