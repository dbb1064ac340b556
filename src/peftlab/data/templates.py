"""Prompt templates other than the chat template: the Alpaca prompt and custom Jinja.

``data.template`` selects how a row becomes a prompt: unset, the tokenizer's chat template
is used (peftlab.data.sft); ``alpaca`` is the classic Stanford Alpaca prompt; anything else
is a Jinja file (``*.jinja``/``*.j2``/``*.txt`` or an existing path) or an inline Jinja string.
The template renders the *prompt* only; the answer follows it directly and ends with the
eos token. As with chat templates, only the answer and eos carry labels.

Templates run in Jinja's immutable sandbox (a config file can't reach Python internals)
with StrictUndefined, so a misspelt variable is an error naming the row instead of a
silently empty prompt. Variables: every field of the row, ``row`` (the whole row),
``instruction``, ``input``, ``system`` (data.system_prompt or the row's system message)
and ``messages`` (the conversation before the final answer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from peftlab.config import ConfigError, DataConfig
from peftlab.data.collate import IGNORE_INDEX
from peftlab.data.readers import DataError
from peftlab.data.sft import (
    SFTStats,
    _bos_to_prepend,
    _encode_pieces,
    _encode_with_offsets,
    record_to_messages,
)

ALPACA_TEMPLATE = (
    "{% if input %}"
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{{ instruction }}\n\n### Input:\n{{ input }}\n\n### Response:\n"
    "{% else %}"
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n"
    "### Instruction:\n{{ instruction }}\n\n### Response:\n"
    "{% endif %}"
)
BUILTIN_TEMPLATES = {"alpaca": ALPACA_TEMPLATE}
_FILE_SUFFIXES = (".jinja", ".jinja2", ".j2", ".txt", ".tmpl")


class PromptTemplate:
    """A compiled, sandboxed prompt template; ``name`` says where it came from."""

    def __init__(self, source: str, name: str):
        env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True,
                                            autoescape=False)
        try:
            self.template = env.from_string(source)
        except TemplateError as exc:
            raise ConfigError(f"data.template ({name}): not a valid Jinja template: {exc}") from None
        self.name = name

    def render(self, variables: dict[str, Any], where: str = "row") -> str:
        try:
            return self.template.render(**variables)
        except TemplateError as exc:
            raise DataError(f"{where}: data.template ({self.name}) failed: {exc}") from None


def load_template(spec: str) -> PromptTemplate:
    """A built-in name, a path to a template file, or an inline Jinja string."""
    if spec in BUILTIN_TEMPLATES:
        return PromptTemplate(BUILTIN_TEMPLATES[spec], spec)
    looks_inline = "{{" in spec or "{%" in spec
    path = Path(spec).expanduser()
    if not looks_inline and (path.suffix.lower() in _FILE_SUFFIXES or path.is_file()):
        if not path.is_file():
            raise ConfigError(f"data.template: template file not found: {path}")
        return PromptTemplate(path.read_text(encoding="utf-8"), str(path))
    if not looks_inline:
        raise ConfigError(f"data.template: {spec!r} is not a built-in template "
                          f"({', '.join(BUILTIN_TEMPLATES)}), an existing file or inline Jinja "
                          "(containing {{ ... }})")
    return PromptTemplate(spec, "inline")


def template_variables(record: dict[str, Any], cfg: DataConfig,
                       where: str) -> tuple[dict[str, Any], str]:
    """(variables for the prompt template, the answer text) of one row."""
    messages = record_to_messages(record, cfg, where)
    answer = messages[-1]["content"]  # record_to_messages ends every conversation on an answer
    history = messages[:-1]
    system = next((m["content"] for m in history if m["role"] == "system"), "")
    last_user = next((m["content"] for m in reversed(history) if m["role"] == "user"), "")
    variables = {k: v for k, v in record.items() if isinstance(k, str) and k.isidentifier()}
    instruction = record.get(cfg.instruction_field)
    extra = record.get(cfg.input_field)
    variables.update(
        row=record,
        instruction=instruction if isinstance(instruction, str) else last_user,
        input=extra if isinstance(extra, str) and isinstance(instruction, str) else "",
        system=system,
        messages=history,
    )
    return variables, answer


def tokenize_prompt_answer(prompt: str, answer: str, tokenizer: Any) -> dict[str, list[int]]:
    """``prompt + answer + eos`` tokenized once; labels only on the answer and eos."""
    text = prompt + answer
    spans = [(len(prompt), len(text))]
    if getattr(tokenizer, "is_fast", False):
        ids, labels = _encode_with_offsets(tokenizer, text, spans)
    else:
        ids, labels = _encode_pieces(tokenizer, text, spans)
    bos = _bos_to_prepend(tokenizer, text)
    if bos is not None:
        ids, labels = [bos] + ids, [IGNORE_INDEX] + labels
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        ids, labels = ids + [eos], labels + [eos]
    return {"input_ids": ids, "labels": labels}


def build_template_examples(
    records: list[dict[str, Any]],
    tokenizer: Any,
    cfg: DataConfig,
    template: PromptTemplate,
    max_length: int,
    source: str,
    row_numbers: list[int] | None = None,
) -> tuple[list[dict[str, list[int]]], SFTStats]:
    """Like :func:`peftlab.data.sft.build_sft_examples`, with the prompt from ``template``."""
    stats = SFTStats(source=source, max_length=max_length, rows=len(records))
    examples = []
    for i, record in enumerate(records):
        where = f"{source}:{row_numbers[i] if row_numbers else i + 1}"
        try:
            variables, answer = template_variables(record, cfg, where)
            prompt = template.render(variables, where)
        except DataError as exc:
            stats.invalid(exc, cfg.on_error)
            continue
        ex = tokenize_prompt_answer(prompt, answer, tokenizer)
        n = len(ex["input_ids"])
        targets = sum(1 for t in ex["labels"][1:] if t != IGNORE_INDEX)
        if n > max_length:
            stats.dropped_too_long += 1
        elif targets == 0:
            stats.dropped_no_target += 1
        else:
            examples.append(ex)
            stats.tokens += n
            stats.target_tokens += targets
            stats.max_len = max(stats.max_len, n)
    stats.kept = len(examples)
    stats.mean_len = stats.tokens / stats.kept if stats.kept else 0.0
    return examples, stats
