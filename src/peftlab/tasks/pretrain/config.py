"""The ``pretrain:`` section of a run config (registered with the task, validated by peftlab.config)."""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.config import ConfigError, choice


@dataclass
class PretrainConfig:
    """``task: pretrain``: language modelling on raw text, cut into ``train.max_length`` blocks.

    ``objective``: ``clm`` (next token, decoders), ``mlm`` (masked tokens, BERT-style
    encoders) or ``auto`` (``mlm`` when the tokenizer has a mask token, else ``clm``).
    """

    objective: str = "auto"  # auto | clm | mlm
    document_field: str | None = None  # record files: rows sharing this value form a document
    txt_split: str = "auto"  # .txt documents: auto | line | paragraph (blank-line separated)
    reset_attention: bool = True  # clm: positions restart per document, no cross-document attention
    mlm_probability: float = 0.15  # mlm: share of tokens (or words) selected as targets
    whole_word_masking: bool = False  # mlm: select whole words, not single sub-word tokens

    def validate(self, where: str) -> None:
        choice(f"{where}.objective", self.objective, ["auto", "clm", "mlm"])
        choice(f"{where}.txt_split", self.txt_split, ["auto", "line", "paragraph"])
        if not 0.0 < self.mlm_probability < 1.0:
            raise ConfigError(f"{where}.mlm_probability must be in (0, 1), "
                              f"got {self.mlm_probability}")
        if self.document_field is not None and not self.document_field.strip():
            raise ConfigError(f"{where}.document_field must be a field name or null")
