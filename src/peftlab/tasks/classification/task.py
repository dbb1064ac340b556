"""Text (or text-pair) classification, as a trained head or as label words of a causal LM.

``mode: head`` loads ``AutoModelForSequenceClassification``: BERT-style encoders get a
``classifier`` on the pooled [CLS] vector, decoders (Llama, ...) a ``score`` layer on the last
real token. The head (``classifier``/``score``, plus BERT's ``pooler`` that feeds it) trains
in full along with the method's parameters and is saved with the adapter:

* a method whose config has ``modules_to_save`` (LoRA) gets the head's names added there by
  the task builder (peft's SEQ_CLS convention), so it trains the head and saves it inside
  ``adapter_model.safetensors`` as peft does;
* with any other method, :meth:`ClassificationTask.prepare_model` (run by the recipe right
  after ``method.apply``) marks a still-frozen head trainable, and :meth:`save` writes it to
  ``classification_head.safetensors`` next to the adapter.

``mode: verbalizer`` keeps the causal LM as it is: the prompt template is filled with the text
and the class logits are the LM's next-token logits of the first token of each label word.
No new parameters, so it also works few-shot: ``data.k_shot`` keeps k training rows per class,
and peftlab.evaluation.in_context scores the same rows as in-context demonstrations instead.

Either way ``labels.json`` (id2label plus how inputs were encoded) is saved with the adapter,
so ``peftlab predict`` rebuilds exactly the training-time inputs.

A binary classifier may decide by a threshold on the positive class's probability instead of
the likelier class (``classification.threshold``). With ``auto`` the threshold maximising
``threshold_metric`` on the validation set is searched at every evaluation (so
``train.best_metric`` and early stopping see the tuned scores) and once more after training
(:meth:`ClassificationTask.calibrate`); the result goes into labels.json, where predict and
eval read it. On imbalanced data (8% unfair clauses) that is worth more than class weights.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.config import ConfigError, RunConfig
from peftlab.data.classification import (
    Encoded,
    LabelledRow,
    balanced_class_weights,
    build_examples,
    check_known_labels,
    class_counts,
    encode_prompt,
    encode_texts,
    grouped_split,
    label_list,
    normalize_label,
    read_labelled,
    render_template,
    stratified_split,
)
from peftlab.data.readers import DataError
from peftlab.data.splits import sample_k_per_class
from peftlab.evaluation.metrics import classification_report, tune_threshold
from peftlab.files import read_json
from peftlab.models.lm import backbone_hidden_states
from peftlab.models.unpadded_encoder import encoder_class_logits, encoder_mean_states
from peftlab.runtime.precision import autocast_for
from peftlab.tasks.base import PreparedTask, Task, TaskSpec, halve_rows, register_task
from peftlab.tasks.classification.config import ClassificationConfig
from peftlab.tasks.classification.tfidf import ENSEMBLE_C, TfidfModel
from peftlab.tasks.heads import load_head, save_head

LABELS_FILE = "labels.json"
HEAD_FILE = "classification_head.safetensors"
# The head: peft's SEQ_CLS modules_to_save (BERT-style ``classifier``, decoder-style ``score``),
# which are new and always trained, plus BERT's ``pooler``, the [CLS] projection the classifier
# reads. The pooler is pretrained, so it is only added to ``modules_to_save`` (methods that
# keep it frozen, like feature_extraction, keep it frozen); sentence-transformers checkpoints
# such as the embedded MiniLM never trained it for this, and training it is worth ~3 points
# of SST-2 accuracy in the integration test.
NEW_HEADS = ["classifier", "score"]
HEAD_MODULES = [*NEW_HEADS, "pooler"]
MAX_LOGGED_CLASSES = 32  # per-class F1 is logged for up to this many classes


class ClassificationTask(Task):
    """Cross-entropy (or focal loss) over class logits from a sequence-classification head.

    ``meta`` is labels.json's content; its ``threshold`` (binary only) is the decision
    threshold on the positive class's probability, None for the likelier class.
    ``tune_threshold``: search that threshold on the validation set (``threshold: auto``).
    """

    peft_task_type = "SEQ_CLS"

    def __init__(self, meta: dict[str, Any], pad_id: int,
                 class_weights: list[float] | None = None, loss: str = "cross_entropy",
                 focal_gamma: float = 2.0, tune_threshold: bool = False):
        self.meta = meta
        self.labels: list[str] = list(meta["labels"])
        self.pad_id = pad_id
        self.class_weights = (torch.tensor(class_weights, dtype=torch.float32)
                              if class_weights is not None else None)
        self.loss_kind = loss
        self.focal_gamma = focal_gamma
        self.tune_threshold = tune_threshold
        self.threshold: float | None = meta.get("threshold")
        self.threshold_metric: str = meta.get("threshold_metric", "f1")
        if (self.threshold is not None or tune_threshold) and len(self.labels) != 2:
            raise ConfigError(f"classification.threshold applies to binary classification; "
                              f"the data has {len(self.labels)} classes {self.labels}")
        self.head_params: dict[str, nn.Parameter] = {}  # heads the task (not the method) saves
        self.tfidf: TfidfModel | None = None  # classification.ensemble: tfidf

    # -- the training contract --------------------------------------------------------
    def length(self, example: dict[str, Any]) -> int:
        return len(example["input_ids"])

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        longest = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), longest), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
        has_types = "token_type_ids" in examples[0]
        token_types = torch.zeros((len(examples), longest), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            input_ids[i, :n] = torch.as_tensor(e["input_ids"], dtype=torch.long)
            attention_mask[i, :n] = 1
            if has_types:
                token_types[i, :n] = torch.as_tensor(e["token_type_ids"], dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "labels": torch.tensor([e["label"] for e in examples], dtype=torch.long)}
        if has_types:
            batch["token_type_ids"] = token_types
        return batch

    def count(self, batch: dict[str, Any]) -> int:
        return int(batch["labels"].shape[0])

    def split_rows(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        return halve_rows(batch)  # one loss term per row

    def logits(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """Class logits (batch, n_classes) in fp32.

        A decoder's ``score`` head is read at the last attended position: transformers finds
        that position by searching for the pad token, which fails when pad == eos and a text
        ends with eos. Encoders (a ``classifier`` on the pooled [CLS]) use their own forward,
        or for BERT and RoBERTa the same computed on real tokens only
        (:mod:`~peftlab.models.unpadded_encoder`, as ``pooling: mean`` is for BERT).
        """
        if self.meta.get("pooling", "model") == "mean":
            return self._mean_pooled_logits(model, batch)
        head = getattr(model, "score", None)
        if isinstance(head, nn.Module) and model.base_model is not model:
            mask = batch["attention_mask"]
            hidden = backbone_hidden_states(model, batch["input_ids"], mask)
            last = (mask.sum(dim=1) - 1).to(hidden.device)  # right padding
            return head(hidden[torch.arange(hidden.shape[0], device=hidden.device), last]).float()
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")
                  if k in batch}
        logits = encoder_class_logits(model, inputs)
        return (model(**inputs).logits if logits is None else logits).float()

    def _mean_pooled_logits(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """``pooling: mean``: the head reads the mean of the last hidden states over the
        attended tokens (a decoder's ``score``, or an encoder's ``classifier`` after its
        dropout, bypassing BERT's pooler)."""
        mask, pooled = batch["attention_mask"], None
        decoder = getattr(model, "score", None)
        if isinstance(decoder, nn.Linear) and model.base_model is not model:
            hidden, head = backbone_hidden_states(model, batch["input_ids"], mask), decoder
        else:
            head = getattr(model, "classifier", None)
            if not isinstance(head, nn.Linear) or model.base_model is model:
                raise ValueError(f"classification.pooling: mean needs a linear head on the hidden "
                                 f"states (BERT-style 'classifier' or a decoder's 'score'); "
                                 f"{type(model).__name__} has {type(head).__name__}")
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")
                      if k in batch}
            pooled = encoder_mean_states(model, inputs)
            if pooled is None:
                hidden = model.base_model(**inputs).last_hidden_state
        if pooled is None:
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        dropout = getattr(model, "dropout", None)  # BERT's, before its classifier
        if isinstance(dropout, nn.Dropout) and head is not decoder:
            pooled = dropout(pooled)
        return head(pooled).float()

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        logits = self.logits(model, batch)
        return self._summed_loss(logits, batch["labels"].to(logits.device)), self.count(batch)

    def _summed_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # A weighted *sum*: the Trainer divides by the number of examples. Balanced weights
        # average to 1 over the training set, so this stays on the unweighted scale.
        weight = None if self.class_weights is None else self.class_weights.to(logits.device)
        if self.loss_kind == "focal":
            return focal_loss(logits, labels, self.focal_gamma, weight)
        return F.cross_entropy(logits, labels, weight=weight, reduction="sum")

    def decide(self, logits: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
        """Class ids from class logits: the likelier class, or (binary, with a threshold)
        the positive class wherever its probability reaches the threshold."""
        threshold = self.threshold if threshold is None else threshold
        if threshold is None:
            return logits.argmax(-1)
        return (logits.float().softmax(-1)[:, 1] >= threshold).long()

    def metric_names(self, examples: list[dict]) -> list[str]:
        """What :meth:`metrics` returns, known before any model runs."""
        per_class = ([f"f1_{label}" for label in self.labels]
                     if len(self.labels) <= MAX_LOGGED_CLASSES else [])
        return ["accuracy", "macro_f1", *per_class, *(["threshold"] if self.tune_threshold
                                                      else [])]

    def metrics(self, model: nn.Module, examples: list[dict], batch_size: int,
                precision: str) -> dict[str, float]:
        """accuracy, macro_f1 and (up to 32 classes) f1_<label>, logged as val_*; with
        ``threshold: auto`` at the threshold tuned on these very examples (also logged)."""
        return self._metrics(self.scores(model, examples, batch_size, precision), examples)

    def validate(self, model: nn.Module, examples: list[dict], batch_size: int,
                 precision: str) -> tuple[float, dict[str, float]]:
        """Loss and metrics read the same logits: one forward over the validation set, not
        the two that the loss pass and :meth:`metrics` would take."""
        logits = predict_logits(model, self, examples, batch_size, precision)
        labels = torch.tensor([e["label"] for e in examples], dtype=torch.long)
        loss = float(self._summed_loss(logits, labels)) / max(len(examples), 1)
        return loss, self._metrics(self._with_ensemble(logits, examples), examples)

    def scores(self, model: nn.Module, examples: list[dict], batch_size: int,
               precision: str = "fp32") -> torch.Tensor:
        """What every decision reads, (n, n_classes): the model's class logits, or with a
        TF-IDF ensemble member the log of the mean of both models' probabilities (softmax of
        it gives that mean back, so thresholds and argmax work on either)."""
        return self._with_ensemble(predict_logits(model, self, examples, batch_size, precision),
                                   examples)

    def _with_ensemble(self, logits: torch.Tensor, examples: list[dict]) -> torch.Tensor:
        if self.tfidf is None:
            return logits
        words = self.tfidf.proba([e["text"] for e in examples])
        return ((logits.float().softmax(-1) + words) / 2).log()

    def _metrics(self, logits: torch.Tensor, examples: list[dict]) -> dict[str, float]:
        threshold = self._tuned(logits, examples)[0] if self.tune_threshold else None
        report = self._report(logits, examples, threshold)
        out = {"accuracy": round(report["accuracy"], 5), "macro_f1": round(report["macro_f1"], 5)}
        if len(self.labels) <= MAX_LOGGED_CLASSES:
            out.update({f"f1_{label}": round(s["f1"], 5)
                        for label, s in report["per_class"].items()})
        if threshold is not None:
            out["threshold"] = round(threshold, 5)
        return out

    def _report(self, logits: torch.Tensor, examples: list[dict],
                threshold: float | None = None) -> dict[str, Any]:
        gold = [e["label"] for e in examples]
        return classification_report(gold, self.decide(logits, threshold), self.labels)

    def _tuned(self, logits: torch.Tensor, examples: list[dict]) -> tuple[float, float]:
        """(threshold, metric value) that maximise ``threshold_metric`` on ``examples``."""
        scores = logits.float().softmax(-1)[:, 1]
        return tune_threshold(scores, [e["label"] for e in examples], self.threshold_metric)

    # -- hooks: the recipe's report, the head, labels.json ----------------------------
    def final_report(self, model: nn.Module, examples: list[dict], batch_size: int,
                     precision: str) -> dict[str, Any]:
        """The full per-class report and confusion matrix (written to eval_classification.json),
        at the decision threshold if there is one, with the argmax scores beside it."""
        logits = self.scores(model, examples, batch_size, precision)
        report = self._report(logits, examples)
        if self.threshold is not None:
            argmax = classification_report([e["label"] for e in examples], logits.argmax(-1),
                                           self.labels)
            report["decision"] = {
                "threshold": self.threshold, "metric": self.threshold_metric,
                "tuned_on_this_set": self.tune_threshold,
                "argmax": {k: argmax[k] for k in ("accuracy", "macro_f1")}
                | {f"f1_{label}": s["f1"] for label, s in argmax["per_class"].items()}}
        return report

    def calibrate(self, model: nn.Module, examples: list[dict], batch_size: int,
                  precision: str) -> None:
        """``threshold: auto``: tune the decision threshold on the validation examples with
        the final weights; :meth:`save` writes it to labels.json."""
        if not self.tune_threshold:
            return
        logits = self.scores(model, examples, batch_size, precision)
        threshold, value = self._tuned(logits, examples)
        at_argmax = self._report(logits, examples)
        before = (at_argmax["per_class"][self.labels[1]]["f1"] if self.threshold_metric == "f1"
                  else at_argmax[self.threshold_metric])
        self.threshold = self.meta["threshold"] = threshold
        print(f"classification: decision threshold {threshold:.4f} on p({self.labels[1]}), "
              f"tuned on {len(examples)} validation rows: {self.threshold_metric} "
              f"{value:.4f} (argmax: {before:.4f})")

    def prepare_model(self, model: nn.Module) -> None:
        """After ``method.apply``: a new head the method left frozen is trained (and saved) by
        the task. (The pretrained pooler is left as the method set it.)"""
        self.head_params = {}
        heads = head_modules(model, NEW_HEADS)
        if not heads:
            raise ValueError(f"{type(model).__name__} has no classification head "
                             f"(expected a module named one of {NEW_HEADS})")
        for name, module in heads.items():
            for pname, p in module.named_parameters():
                if not p.requires_grad:
                    p.requires_grad_(True)
                    self.head_params[f"{name}.{pname}"] = p
        if self.head_params:
            print(f"classification: the method left the new head frozen; the task trains it and "
                  f"saves it to {HEAD_FILE} ({', '.join(self.head_params)})")

    def save(self, model: nn.Module, directory: str | Path) -> None:
        """labels.json (+ the head, when the method does not save it itself)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = dict(self.meta, head_file=HEAD_FILE if self.head_params else None)
        (directory / LABELS_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if self.head_params:
            save_head(self.head_params, directory / HEAD_FILE)
        if self.tfidf is not None:
            self.tfidf.save(directory)

    def restore(self, model: nn.Module, directory: str | Path) -> None:
        """What :meth:`save` wrote beyond the method's adapter: the head, if labels.json
        names one, and the decision threshold (``peftlab eval`` calls this after loading the
        adapter)."""
        directory = Path(directory)
        if not (directory / LABELS_FILE).is_file():
            return
        meta = read_meta(directory)
        if meta.get("head_file"):
            load_head(model, directory / HEAD_FILE)
        if meta.get("ensemble") == "tfidf":
            self.tfidf = TfidfModel.load(directory)
        self.threshold = meta.get("threshold")
        self.threshold_metric = meta.get("threshold_metric", self.threshold_metric)
        self.tune_threshold = False  # the saved threshold is the one to use


class VerbalizerTask(ClassificationTask):
    """Class logits = a causal LM's next-token logits of each label word's first token."""

    peft_task_type = "CAUSAL_LM"

    def __init__(self, meta: dict[str, Any], pad_id: int,
                 class_weights: list[float] | None = None, **options: Any):
        super().__init__(meta, pad_id, class_weights, **options)
        self.label_token_ids = torch.tensor(meta["label_token_ids"], dtype=torch.long)

    def logits(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        mask = batch["attention_mask"]
        hidden = backbone_hidden_states(model, batch["input_ids"], mask)
        last = mask.sum(dim=1) - 1  # right padding: the prompt's last token
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]
        # The LM head on one position per row, not on the whole sequence.
        logits = model.get_output_embeddings()(h)
        return logits[:, self.label_token_ids.to(logits.device)].float()

    def prepare_model(self, model: nn.Module) -> None:
        self.head_params = {}  # no new parameters


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """Summed focal loss ``w_y * (1 - p_y) ** gamma * -log p_y`` (Lin et al., 2017): examples
    the model already gets right count less, so the rare class's hard cases dominate.
    ``gamma = 0`` is (weighted) cross-entropy."""
    logp = F.log_softmax(logits.float(), dim=-1).gather(1, labels[:, None]).squeeze(1)
    loss = -((1 - logp.exp()).clamp(min=0) ** gamma) * logp
    if weight is not None:
        loss = loss * weight[labels]
    return loss.sum()


@torch.no_grad()
def predict_logits(model: nn.Module, task, examples: list[dict], batch_size: int,
                   precision: str = "fp32") -> torch.Tensor:
    """Class logits (n_examples, n_classes) in fp32, in the order of ``examples``.

    Batches are formed from length-sorted examples (less padding) and put back in order.
    """
    was_training = model.training
    model.eval()
    out = torch.empty(len(examples), len(task.labels))
    order = sorted(range(len(examples)), key=lambda i: task.length(examples[i]))
    with autocast_for(precision):
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            logits = task.logits(model, task.collate([examples[i] for i in idx]))
            out[idx] = logits.float().cpu()
    model.train(was_training)
    return out


def head_modules(model: nn.Module, names: list[str] = HEAD_MODULES) -> dict[str, nn.Module]:
    """Head modules by full name: ``names`` at any depth, matched by the last name component
    as LoRA's modules_to_save is (outermost match only)."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in names and not any(
                name.startswith(f + ".") for f in found):
            found[name] = module
    return found


# ----------------------------------------------------------------------------- building


def default_template(text_pair_field: str | None) -> str:
    return "{text}\n{text_pair}\nLabel:" if text_pair_field else "{text}\nLabel:"


def label_token_ids(tokenizer, template: str, words: list[str], labels: list[str]) -> list[int]:
    """Token id of each label word as it would follow the prompt.

    The word is appended to a filled-in template (with a space unless the template ends in
    whitespace or the word starts with it), so BPE tokenizers give the " positive" token the
    model would actually predict. If the word merges with the prompt's last token, the word's
    own first token is used.
    """
    probe = render_template(template, "example", "example")
    base = tokenizer(probe, add_special_tokens=False)["input_ids"]
    ids = []
    for word in words:
        sep = "" if probe[-1:].isspace() or word[:1].isspace() else " "
        full = tokenizer(probe + sep + word, add_special_tokens=False)["input_ids"]
        if len(full) > len(base) and full[:len(base)] == base:
            ids.append(full[len(base)])
        else:
            ids.append(tokenizer(sep + word, add_special_tokens=False)["input_ids"][0])
    first: dict[int, str] = {}
    for label, tid in zip(labels, ids, strict=True):
        if tid in first:
            raise ConfigError(
                f"classification.verbalizer: labels {first[tid]!r} and {label!r} start with the "
                f"same token {tokenizer.convert_ids_to_tokens(tid)!r}; pick words whose first "
                "tokens differ")
        first[tid] = label
    return ids


def verbalizer_words(cfg_words: dict[Any, str] | None, labels: list[str]) -> list[str]:
    """The word of every label in class order (default: the label itself)."""
    if cfg_words is None:
        return list(labels)
    words = {normalize_label(k): v for k, v in cfg_words.items()}
    missing = [label for label in labels if label not in words]
    extra = [k for k in words if k not in labels]
    if missing:
        raise ConfigError(f"classification.verbalizer: no word for label(s) {missing} "
                          f"(labels: {labels})")
    if extra:
        raise ConfigError(f"classification.verbalizer: label(s) {extra} are not in the data's "
                          f"labels {labels}")
    return [words[label] for label in labels]


def make_encoder(meta: dict[str, Any], tokenizer):
    """``encode(texts, pairs) -> list[Encoded]`` for the inputs ``meta`` describes."""
    max_length = meta["max_length"]
    if meta["mode"] == "verbalizer":
        template = meta["prompt_template"]
        eos = tokenizer.eos_token_id

        def encode(texts: list[str], pairs: list[str] | None) -> list[Encoded]:
            out = []
            for i, text in enumerate(texts):
                enc = encode_prompt(tokenizer, template, text, pairs[i] if pairs else None,
                                    max_length)
                # A tokenizer that appends EOS would hide the prompt's cue from the LM head.
                if eos is not None and len(enc.input_ids) > 1 and enc.input_ids[-1] == eos:
                    enc.input_ids = enc.input_ids[:-1]
                out.append(enc)
            return out

        return encode
    return lambda texts, pairs: encode_texts(tokenizer, texts, pairs, max_length)


def task_from_meta(meta: dict[str, Any], tokenizer, class_weights: list[float] | None = None,
                   **options: Any) -> ClassificationTask:
    """The task object for labels.json's ``meta`` (``options``: the training-only knobs)."""
    cls = VerbalizerTask if meta["mode"] == "verbalizer" else ClassificationTask
    return cls(meta, pad_id=tokenizer.pad_token_id, class_weights=class_weights, **options)


def build_classification_task(cfg: RunConfig, tokenizer: Any) -> PreparedTask:
    """Task builder for ``task: classification``.

    A validation label outside the training labels (or outside ``data.labels``) is an error
    even with ``data.on_error: skip``: skipping it would silently change what is measured.
    """
    if not cfg.data.train:
        raise DataError("data.train: no training file given")
    if tokenizer.pad_token_id is None:
        raise ValueError("classification needs a tokenizer with a pad token (or eos/unk)")
    rows, val_rows, labels, report = read_classification_rows(cfg)
    meta = classification_meta(cfg, labels, tokenizer)
    if meta["mode"] == "verbalizer":
        model_kind, model_kwargs = "causal_lm", {}
    else:
        model_kind, model_kwargs = "sequence_classification", {"labels": labels}
        _add_head_to_modules_to_save(cfg.method)

    encode = make_encoder(meta, tokenizer)
    train, train_stats = build_examples(rows, labels, encode)
    val, val_stats = build_examples(val_rows, labels, encode)
    ccfg = cfg.task_config
    counts = list(train_stats["class_counts"].values())
    weights = balanced_class_weights(counts) if ccfg.class_weights == "balanced" else None
    report.update(labels=labels, train=train_stats, validation=val_stats,
                  class_weights=dict(zip(labels, weights, strict=True)) if weights else None)
    if ccfg.threshold == "auto" and not val:
        raise ConfigError("classification.threshold: auto tunes the threshold on validation "
                          "data; set data.validation or data.validation_split")
    task = task_from_meta(meta, tokenizer, weights, loss=ccfg.loss, focal_gamma=ccfg.focal_gamma,
                          tune_threshold=ccfg.threshold == "auto")
    if ccfg.ensemble == "tfidf":
        task.tfidf = _fit_tfidf(rows, labels, cfg.train.seed, report)
    return PreparedTask(task, train, val, report, model_kind=model_kind,
                        model_kwargs=model_kwargs)


def _fit_tfidf(rows: list[LabelledRow], labels: list[str], seed: int,
               report: dict[str, Any]) -> TfidfModel:
    """The ensemble's TF-IDF member, fitted on the training rows before any training."""
    started = time.perf_counter()
    try:
        model = TfidfModel.fit([r.joined for r in rows], [labels.index(r.label) for r in rows],
                               len(labels), seed=seed)
    except ValueError as err:
        raise DataError(f"classification.ensemble: tfidf: {err}") from None
    report["ensemble"] = {"member": "tfidf+logreg", "C": ENSEMBLE_C,
                          "features": len(model.vocabulary),
                          "seconds": round(time.perf_counter() - started, 1)}
    print(f"classification: TF-IDF ensemble member fitted on {len(rows)} rows "
          f"({len(model.vocabulary)} word 1-2-grams, {report['ensemble']['seconds']} s)")
    return model


def read_classification_rows(
        cfg) -> tuple[list[LabelledRow], list[LabelledRow], list[str], dict[str, Any]]:
    """(train rows, validation rows, class order, data report) as ``cfg.data`` describes.

    ``data.k_shot`` keeps k training rows per class (:func:`sample_k_per_class`, seeded by
    ``train.seed``) after ``validation_split``, so the held-out rows are the same for every k
    and the in-context baseline (peftlab.evaluation.in_context) can use the very same rows.
    """
    data = cfg.data
    if not data.train:
        raise DataError("data.train: no training file given")
    fields = (data.text_field, data.text_pair_field, data.label_field)
    rows, train_file = read_labelled(data.train, *fields, on_error=data.on_error,
                                     max_rows=data.max_rows, group_field=data.group_field)
    report: dict[str, Any] = {"train_file": train_file}
    labels = label_list([r.label for r in rows], data.labels)
    check_known_labels(rows, labels, data.label_field, what="data.labels")
    if data.validation:
        # no groups needed: a separate validation file is held out already
        val_rows, val_file = read_labelled(data.validation, *fields, on_error=data.on_error)
        report["validation_file"] = val_file
        check_known_labels(val_rows, labels, data.label_field)
    elif data.group_field and data.validation_split:
        try:
            rows, val_rows = grouped_split(rows, [r.group for r in rows], data.validation_split,
                                           cfg.train.seed)
        except ValueError as err:
            raise DataError(f"{data.train}: data.group_field {data.group_field!r}: {err}") from None
        report["validation_groups"] = sorted({r.group for r in val_rows})
    else:
        rows, val_rows = stratified_split(rows, [r.label for r in rows], data.validation_split,
                                          cfg.train.seed)
    if len(labels) < 2:
        raise DataError(f"{data.train}: classification needs at least 2 classes, found {labels} "
                        f"in field {data.label_field!r}")
    if data.k_shot is not None:
        available = class_counts([r.label for r in rows], labels)
        try:
            rows = sample_k_per_class(rows, lambda r: r.label, data.k_shot, cfg.train.seed,
                                      classes=labels, content_key=_row_content)
        except ValueError as err:
            raise DataError(f"data.k_shot={data.k_shot}: {data.train} (field "
                            f"{data.label_field!r}, after validation_split): {err}") from None
        report["k_shot"] = {"k": data.k_shot, "seed": cfg.train.seed,
                            "rows_before": sum(available.values()), "rows_kept": len(rows),
                            "available_per_class": available}
    return rows, val_rows, labels, report


def _row_content(row: LabelledRow) -> str:
    """What a k-shot draw is keyed on: the texts and label, not the row number."""
    return json.dumps([row.text, row.text_pair, row.label])


def classification_meta(cfg, labels: list[str], tokenizer) -> dict[str, Any]:
    """labels.json's content: the class order and how inputs are encoded and scored."""
    data, ccfg = cfg.data, cfg.sections["classification"]
    meta: dict[str, Any] = {
        "id2label": {str(i): label for i, label in enumerate(labels)},
        "labels": labels,
        "mode": ccfg.mode,
        "text_field": data.text_field,
        "text_pair_field": data.text_pair_field,
        "label_field": data.label_field,
        "max_length": cfg.train.max_length,
        "threshold": ccfg.threshold if isinstance(ccfg.threshold, float) else None,
        "threshold_metric": ccfg.threshold_metric,
        "ensemble": ccfg.ensemble,
        "pooling": ccfg.pooling,
    }
    if ccfg.mode == "verbalizer":
        template = ccfg.prompt_template or default_template(data.text_pair_field)
        if ("{text_pair}" in template) != bool(data.text_pair_field):
            raise ConfigError("classification.prompt_template must use {text_pair} exactly when "
                              f"data.text_pair_field is set (it is {data.text_pair_field!r})")
        words = verbalizer_words(ccfg.verbalizer, labels)
        meta.update(prompt_template=template, verbalizer=dict(zip(labels, words, strict=True)),
                    label_token_ids=label_token_ids(tokenizer, template, words, labels))
    elif ccfg.verbalizer or ccfg.prompt_template:
        raise ConfigError("classification.verbalizer/prompt_template only apply to "
                          "classification.mode: verbalizer")
    return meta


def _add_head_to_modules_to_save(method_cfg: Any) -> None:
    """Methods with a ``modules_to_save`` option train and save the new head themselves."""
    if method_cfg is None or not hasattr(method_cfg, "modules_to_save"):
        return
    current = list(method_cfg.modules_to_save or [])
    method_cfg.modules_to_save = current + [m for m in HEAD_MODULES if m not in current]


def read_meta(directory: str | Path) -> dict[str, Any]:
    """labels.json of a saved classifier, checked."""
    path = Path(directory) / LABELS_FILE
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"{directory}: no such adapter directory")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; the adapter was not trained with "
                                "task: classification")
    meta = read_json(path)
    for key in ("labels", "mode", "text_field", "max_length"):
        if key not in meta:
            raise ValueError(f"{path}: missing key {key!r}")
    if meta["mode"] == "verbalizer" and len(meta.get("label_token_ids") or []) != len(meta["labels"]):
        raise ValueError(f"{path}: key 'label_token_ids' must hold one id per label")
    return meta


register_task(TaskSpec("classification", build_classification_task, ClassificationConfig))
