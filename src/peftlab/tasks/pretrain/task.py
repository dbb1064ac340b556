"""Continued ("domain-adaptive") pre-training on raw text: causal or masked language modelling.

The first move with a pile of unlabelled domain text (contracts, papers, logs) before any
task fine-tuning: keep pre-training on it. Any method trains this way and saves like any
run; a later run starts from the result with ``init_from`` (peftlab.methods.chain).

* ``objective: clm`` (decoders): next-token loss on every token of the blocks, computed
  exactly as SFT's (:class:`~peftlab.tasks.sft.task.SFTTask`: the LM head only where a
  label is, packed segments through restarted ``position_ids``).
* ``objective: mlm`` (BERT-style encoders, ``AutoModelForMaskedLM``): masked-token loss
  with BERT's 15% / 80-10-10 masking (peftlab.data.masking), drawn afresh per batch. A
  checkpoint without an MLM head (the embedded MiniLM) gets a new one; its new parameters
  (transform and output bias; the decoder is tied to the frozen word embeddings) are
  trained by the task when the method leaves them frozen and saved to ``mlm_head.safetensors``.

Before training (:meth:`baseline`) and after it (:meth:`final_report`) the task measures
the held-out domain loss/perplexity and, with ``eval.forgetting_corpus``, the loss on
general text (causal: the sliding-window perplexity of peftlab.evaluation.perplexity, as for
SFT; masked: the MLM loss of fixed-masked blocks of the corpus's first
``eval.forgetting_max_tokens`` tokens); both go to ``eval_pretrain.json`` and report.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.config import ConfigError, RunConfig
from peftlab.data.collate import IGNORE_INDEX
from peftlab.data.documents import Document, masked_blocks, tokenize_documents
from peftlab.data.masking import mask_tokens
from peftlab.evaluation.loss import evaluate_loss, perplexity
from peftlab.evaluation.sft_eval import measure_forgetting
from peftlab.methods import get_method
from peftlab.models.lm import masked_lm_head, masked_lm_loss
from peftlab.tasks.base import PreparedTask, TaskSpec, register_task
from peftlab.tasks.heads import load_head, save_head
from peftlab.tasks.pretrain.config import PretrainConfig
from peftlab.tasks.pretrain.data import mask_once, prepare_pretrain_data
from peftlab.tasks.sft.task import SFTTask

MLM_HEAD_FILE = "mlm_head.safetensors"


class CausalPretrainTask(SFTTask):
    """Next-token loss on raw-text blocks, with before/after held-out and forgetting numbers."""

    measures_forgetting = True
    objective = "clm"
    loss_name = "next-token loss"

    def __init__(self, cfg: RunConfig, tokenizer: Any):
        super().__init__(pad_id=tokenizer.pad_token_id)
        self.cfg, self.tokenizer = cfg, tokenizer
        self.before: dict[str, Any] = {}

    # -- before / after ------------------------------------------------------------------
    def baseline(self, model: nn.Module, examples: list[dict[str, Any]], batch_size: int,
                 precision: str) -> None:
        self.before = self.measure(model, examples, batch_size, precision)
        for name, m in self.before.items():
            print(f"pretrain: before training, {name} {self.loss_name} {m['loss']:.4f} "
                  f"(perplexity {m['perplexity']:.3f})")

    def final_report(self, model: nn.Module, examples: list[dict[str, Any]], batch_size: int,
                     precision: str) -> dict[str, Any] | None:
        after = self.measure(model, examples, batch_size, precision)
        if not after:
            return None
        report: dict[str, Any] = {"objective": self.objective, "loss": self.loss_name}
        for name, m in after.items():
            before = self.before.get(name)
            entry = {"after": m}
            if before is not None:
                entry.update(before=before,
                             relative_change=m["perplexity"] / before["perplexity"] - 1.0)
            report[name] = entry
            print(f"pretrain: {name} perplexity "
                  + (f"{before['perplexity']:.3f} -> " if before else "")
                  + f"{m['perplexity']:.3f}")
        return report

    def report_lines(self, report: dict[str, Any]) -> list[str]:
        lines = [f"## {self.loss_name} before and after continued pre-training", "",
                 "| text | loss before | loss after | perplexity before | perplexity after "
                 "| change |", "|---|---|---|---|---|---|"]
        for name in ("domain", "forgetting"):
            entry = report.get(name)
            if not entry:
                continue
            b, a = entry.get("before"), entry["after"]
            label = ("held-out domain documents" if name == "domain"
                     else f"general: {a.get('corpus', '')}")
            lines.append(
                f"| {label} | {b['loss']:.4f} | {a['loss']:.4f} | {b['perplexity']:.3f} | "
                f"{a['perplexity']:.3f} | {100 * entry['relative_change']:+.2f}% |" if b else
                f"| {label} | - | {a['loss']:.4f} | - | {a['perplexity']:.3f} | - |")
        return [*lines, ""]

    # -- measuring -----------------------------------------------------------------------
    def measure(self, model: nn.Module, examples: list[dict[str, Any]], batch_size: int,
                precision: str) -> dict[str, dict[str, Any]]:
        """``{"domain": {...}, "forgetting": {...}}`` (those that are configured)."""
        out: dict[str, dict[str, Any]] = {}
        if examples:
            loss = evaluate_loss(model, self, examples, batch_size, precision)
            out["domain"] = {"loss": loss, "perplexity": perplexity(loss),
                             "blocks": len(examples)}
        if self.cfg.eval.forgetting_corpus is not None:
            out["forgetting"] = self.forgetting(model, precision)
        return out

    def forgetting(self, model: nn.Module, precision: str) -> dict[str, Any]:
        m = measure_forgetting(model, self.tokenizer, self.cfg, precision)
        return {**m, "loss": m["nll"]}


class MaskedPretrainTask(CausalPretrainTask):
    """Masked-token loss (BERT-style masking) on raw-text blocks of an encoder."""

    peft_task_type = None  # peft has no masked-LM task type; adapters load without one
    objective = "mlm"
    loss_name = "masked-LM loss"

    def __init__(self, cfg: RunConfig, tokenizer: Any):
        super().__init__(cfg, tokenizer)
        self.pcfg: PretrainConfig = cfg.task_config
        self.mask_id, self.vocab_size = tokenizer.mask_token_id, len(tokenizer)
        self.head_params: dict[str, nn.Parameter] = {}
        self._corpus: list[dict[str, Any]] | None = None

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Pad; blocks without fixed labels (training) are masked now, from the torch RNG."""
        longest = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, IGNORE_INDEX)
        maskable = torch.zeros_like(ids, dtype=torch.bool)
        starts = torch.ones_like(ids, dtype=torch.bool)
        fixed = all("labels" in e for e in examples)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[i, :n] = torch.as_tensor(e["input_ids"])
            mask[i, :n] = 1
            if fixed:
                labels[i, :n] = torch.as_tensor(e["labels"])
            else:
                maskable[i, :n] = torch.as_tensor(e["special"]) == 0
                if "word_starts" in e:
                    starts[i, :n] = torch.as_tensor(e["word_starts"])
        if not fixed:
            whole = "word_starts" in examples[0]
            ids, labels = mask_tokens(ids, maskable, self.pcfg.mlm_probability, self.mask_id,
                                      self.vocab_size, starts if whole else None)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def count(self, batch: dict[str, Any]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        loss = masked_lm_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        return loss, self.count(batch)

    def metric_names(self, examples: list[dict[str, Any]]) -> list[str]:
        return []

    def metrics(self, model: nn.Module, examples: list[dict[str, Any]], batch_size: int,
                precision: str) -> dict[str, float]:
        return {}

    # -- the MLM head --------------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> None:
        """Train the head's own parameters when the method left them frozen (a head new to
        the checkpoint must learn; the tied decoder stays the frozen word embeddings)."""
        self.head_params = {}
        head = masked_lm_head(model)
        prefix = next(name for name, child in model.named_children() if child is head)
        embedding = model.get_input_embeddings().weight
        for name, p in head.named_parameters():
            if p is not embedding and not p.requires_grad:
                p.requires_grad_(True)
                self.head_params[f"{prefix}.{name}"] = p
        if self.head_params:
            print(f"pretrain: the task trains the MLM head ({', '.join(self.head_params)}) and "
                  f"saves it to {MLM_HEAD_FILE}")

    def save(self, model: nn.Module, directory: Path) -> None:
        if self.head_params:
            save_head(self.head_params, Path(directory) / MLM_HEAD_FILE)

    def restore(self, model: nn.Module, directory: Path) -> None:
        if (Path(directory) / MLM_HEAD_FILE).is_file():
            load_head(model, Path(directory) / MLM_HEAD_FILE)

    # -- forgetting: MLM loss on fixed-masked blocks of the general corpus ---------------
    def forgetting(self, model: nn.Module, precision: str) -> dict[str, Any]:
        e = self.cfg.eval
        if self._corpus is None:
            self._corpus = self._corpus_blocks()
        loss = evaluate_loss(model, self, self._corpus, e.batch_size, precision)
        targets = sum(self.count(self.collate([b])) for b in self._corpus)
        return {"corpus": e.forgetting_corpus, "loss": loss, "perplexity": perplexity(loss),
                "targets": targets, "window": e.forgetting_window,
                "max_tokens": e.forgetting_max_tokens}

    def _corpus_blocks(self) -> list[dict[str, Any]]:
        e = self.cfg.eval
        path = Path(e.forgetting_corpus)
        text = path.read_text(encoding="utf-8")[:16 * e.forgetting_max_tokens]
        ids = tokenize_documents([Document(str(path), text)], self.tokenizer)[0]["ids"]
        doc = {"ids": ids[:e.forgetting_max_tokens]}
        rows = masked_blocks([doc], e.forgetting_window, self.tokenizer.cls_token_id,
                             self.tokenizer.sep_token_id)
        return mask_once(rows, self.pcfg.mlm_probability, self.mask_id, self.vocab_size,
                         self.cfg.train.seed)


def resolve_objective(objective: str, tokenizer: Any) -> str:
    """``auto``: masked LM when the tokenizer has a mask token (BERT-style), else causal."""
    if objective != "auto":
        return objective
    return "mlm" if getattr(tokenizer, "mask_token_id", None) is not None else "clm"


def build_pretrain_task(cfg: RunConfig, tokenizer: Any) -> PreparedTask:
    """Task builder for ``task: pretrain``."""
    objective = resolve_objective(cfg.task_config.objective, tokenizer)
    method = get_method(cfg.method_name)
    if objective == "clm" and cfg.task_config.reset_attention and method.virtual_tokens:
        raise ConfigError(f"pretrain.reset_attention can't be used with method "
                          f"{cfg.method_name!r}: its virtual tokens would only precede the first "
                          "document of each block; set pretrain.reset_attention: false")
    if tokenizer.pad_token_id is None:
        raise ConfigError("pretrain: the tokenizer has no pad token (nor eos/unk to pad with)")
    train, val, report = prepare_pretrain_data(cfg, tokenizer, objective)
    if objective == "clm":
        return PreparedTask(CausalPretrainTask(cfg, tokenizer), train, val, report,
                            model_kind="causal_lm")
    return PreparedTask(MaskedPretrainTask(cfg, tokenizer), train, val, report,
                        model_kind="masked_lm")


register_task(TaskSpec("pretrain", build_pretrain_task, PretrainConfig))
