"""Classifiers served next to (or instead of) a chat model: ``peftlab serve --classifier
NAME=ADAPTER_DIR`` and ``POST /v1/classify``.

A classifier is a different model from the served causal LM (often an encoder such as
minilm-l6), so it does not join the continuous batch: each is loaded once and runs one request
at a time under a lock (a request's texts are one batched forward pass; two requests sharing
torch's threads would only slow each other), in a worker thread so the event loop stays free.
The label is decided exactly as ``peftlab predict`` decides it, by the decision threshold
saved with the adapter when it has one.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from peftlab.serve.engine import RequestError
from peftlab.tasks.classification.predict import Classifier, load_classifier


class Classifiers:
    """Loaded classifiers by served name."""

    def __init__(self, adapters: dict[str, str | Path] | None = None,
                 loaded: dict[str, Classifier] | None = None):
        self._models: dict[str, Classifier] = dict(loaded or {})
        for name, directory in (adapters or {}).items():
            self._models[name] = load_classifier(directory)
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return list(self._models)

    def __contains__(self, name: str) -> bool:
        return name in self._models

    def info(self, name: str) -> dict[str, Any]:
        clf = self._models[name]
        return {"labels": clf.labels, "threshold": clf.task.threshold,
                "text_pair": clf.meta.get("text_pair_field") is not None}

    def classify(self, name: str, texts: list[str], pairs: list[str] | None) -> dict[str, Any]:
        """``{labels, probabilities, truncated, threshold, classes}`` for ``texts``."""
        clf = self._models[name]
        wants_pairs = clf.meta.get("text_pair_field") is not None
        if wants_pairs and pairs is None:
            raise RequestError(f"classifier {name!r} was trained on text pairs: send "
                               "'text_pair' with one second text per input", param="text_pair")
        if not wants_pairs and pairs is not None:
            raise RequestError(f"classifier {name!r} takes single texts: drop 'text_pair'",
                               param="text_pair")
        if pairs is not None and len(pairs) != len(texts):
            raise RequestError(f"text_pair has {len(pairs)} items but input has {len(texts)}",
                               param="text_pair")
        with self._lock:
            labels, probs, truncated = clf.classify(texts, pairs)
        return {"labels": labels, "probabilities": probs.tolist(), "truncated": truncated,
                "threshold": clf.task.threshold, "classes": clf.labels}
