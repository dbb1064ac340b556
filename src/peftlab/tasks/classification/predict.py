"""Predicting with a saved classifier (base model + adapter + labels.json): texts or a file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.data.classification import LabelledRow, build_examples, labelled_row, read_labelled
from peftlab.files import read_json
from peftlab.methods.chain import load_adapter
from peftlab.models import load_model
from peftlab.tasks.classification.task import (
    make_encoder,
    read_meta,
    task_from_meta,
)


@dataclass
class Classifier:
    """A loaded classifier: the model with its adapter, tokenizer, task and labels.json."""

    model: nn.Module
    tokenizer: Any
    task: Any
    meta: dict[str, Any]

    @property
    def labels(self) -> list[str]:
        return self.task.labels

    def _encode(self, texts: list[str], text_pairs: list[str] | None) -> tuple[list[dict], int]:
        rows = [LabelledRow("<input>", i + 1, t, text_pairs[i] if text_pairs else None, None)
                for i, t in enumerate(texts)]
        examples, stats = build_examples(rows, self.labels, make_encoder(self.meta, self.tokenizer))
        return examples, stats["truncated"]

    def predict_proba(self, texts: list[str], text_pairs: list[str] | None = None,
                      batch_size: int = 32) -> torch.Tensor:
        """Class probabilities (n, n_classes) for raw texts."""
        examples, _ = self._encode(texts, text_pairs)
        return self.task.scores(self.model, examples, batch_size).softmax(-1)

    def classify(self, texts: list[str], text_pairs: list[str] | None = None,
                 batch_size: int = 32) -> tuple[list[str], torch.Tensor, int]:
        """(the label of each text, class probabilities, how many texts were cut to the
        classifier's max_length): labels as ``predict`` decides them, i.e. by the saved
        decision threshold when the classifier has one."""
        examples, truncated = self._encode(texts, text_pairs)
        logits = self.task.scores(self.model, examples, batch_size)
        labels = [self.labels[i] for i in self.task.decide(logits).tolist()]
        return labels, logits.softmax(-1), truncated


def load_classifier(adapter: str | Path, model: str | None = None) -> Classifier:
    """Load the base model (``model``, default: the adapter's base_model_name_or_path), apply
    the saved adapter (any registered method; a chained run's earlier adapters are merged
    first) and the task's saved head, if any.

    The model loads quietly: transformers would report the new head as MISSING, although it
    is restored from the adapter right after."""
    adapter = Path(adapter)
    meta = read_meta(adapter)
    if model is None:
        model = _base_model_of(adapter)
    if meta["mode"] == "verbalizer":
        base, tokenizer = load_model(model, kind="causal_lm", quiet=True)
    else:
        base, tokenizer = load_model(model, kind="sequence_classification",
                                     labels=meta["labels"], quiet=True)
    load_adapter(base, adapter)  # after the chain it was trained on (init_from), if any
    task = task_from_meta(meta, tokenizer)
    task.restore(base, adapter)  # the head, when the task saved it itself; the threshold
    base.eval()
    return Classifier(base, tokenizer, task, meta)


def _base_model_of(adapter: Path) -> str:
    path = adapter / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (is {adapter} an adapter directory?)")
    name = read_json(path).get("base_model_name_or_path")
    if not name:
        raise ValueError(f"{path}: no 'base_model_name_or_path'; pass --model")
    return str(name)


def predict_file(input: str | Path | list, adapter: str | Path, model: str | None = None,
                 output: str | Path | None = None, text_field: str | None = None,
                 text_pair_field: str | None = None, batch_size: int = 32,
                 classifier: Classifier | None = None) -> dict[str, Any]:
    """Predict every row of ``input`` (a data file, or a list of texts / row dicts).

    Returns ``{"predictions": [{row, prediction, probabilities[, gold]}], "rows", "accuracy",
    "labelled", "truncated", "threshold"}``; accuracy is over rows that carry a known label.
    A binary classifier with a decision threshold (labels.json) predicts the positive class
    where its probability reaches the threshold. With ``output`` the predictions are also
    written there, one JSON line per input row.
    """
    clf = classifier or load_classifier(adapter, model)
    meta = clf.meta
    text_field = text_field or meta["text_field"]
    text_pair_field = text_pair_field or meta.get("text_pair_field")
    label_field = meta.get("label_field", "label")
    if isinstance(input, list):
        rows = _rows_from_list(input, text_field, text_pair_field, label_field)
    else:
        rows, _ = read_labelled(str(input), text_field, text_pair_field, label_field,
                                require_label=False)
    gold = [r.label for r in rows]
    for r in rows:
        r.label = None  # encode without labels: gold may hold classes the model never saw
    examples, stats = build_examples(rows, clf.labels, make_encoder(meta, clf.tokenizer))
    logits = clf.task.scores(clf.model, examples, batch_size)
    probs, decided = logits.softmax(-1), clf.task.decide(logits)

    predictions = []
    for r, p, best, g in zip(rows, probs.tolist(), decided.tolist(), gold, strict=True):
        item: dict[str, Any] = {"row": r.row, "prediction": clf.labels[best],
                                "probabilities": {lab: round(v, 6)
                                                  for lab, v in zip(clf.labels, p, strict=True)}}
        if g is not None:
            item["gold"] = g
        predictions.append(item)
    labelled = [x for x in predictions if "gold" in x]
    correct = sum(x["gold"] == x["prediction"] for x in labelled)
    if output is not None:
        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(x) + "\n" for x in predictions))
    return {"rows": len(predictions), "labelled": len(labelled),
            "accuracy": correct / len(labelled) if labelled else None,
            "truncated": stats["truncated"], "output": str(output) if output else None,
            "threshold": clf.task.threshold,
            "predictions": predictions}


def _rows_from_list(items: list, text_field: str, text_pair_field: str | None,
                    label_field: str) -> list:
    rows = []
    for i, item in enumerate(items, start=1):
        if isinstance(item, str):
            rows.append(LabelledRow("<input>", i, item, None, None))
        elif isinstance(item, dict):
            rows.append(labelled_row(item, "<input>", i, text_field, text_pair_field,
                                      label_field, require_label=False))
        else:
            raise ValueError(f"<input>:{i}: expected a string or a mapping, "
                             f"got {type(item).__name__}")
    return rows
