"""TF-IDF word 1-2-grams: the features of the classical baseline (peftlab.lab.baseline) and of
``classification.ensemble: tfidf``, a logistic regression beside the network.

Why an ensemble: on CLAUDETTE's unfair clauses the n-gram model is right where the fine-tuned
encoder is weak (rare categories with fixed wording, e.g. arbitration) and the other way round,
so the mean of the two models' probabilities beats either one under document-grouped
cross-validation (README, "CLAUDETTE"). The logistic regression is fitted on the run's
training rows before training starts, so every validation metric, the best-step choice and the
tuned threshold already read the mean.

Saved without pickle: the vocabulary in ``tfidf.json``, idf weights and coefficients in
``tfidf.safetensors``; :meth:`TfidfModel.proba` recomputes scikit-learn's TF-IDF transform and
the logistic function from them (a test checks it against scikit-learn's own).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.numpy import save_file

from peftlab.files import read_json, read_safetensors

if TYPE_CHECKING:
    from sklearn.feature_extraction.text import TfidfVectorizer  # type hints only

# scikit-learn is imported where it is used: importing it costs ~1.5 s, which every run that
# imports the task registry would pay otherwise (the ensemble and the baseline are opt-in).

TFIDF_JSON, TFIDF_WEIGHTS = "tfidf.json", "tfidf.safetensors"
ENSEMBLE_C = 10.0  # weak regularisation: the network carries the smooth part of the decision
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def normalize_text(text: str) -> str:
    """Lower-case, and every number one token (the CLAUDETTE authors' ``linear_svm.py``)."""
    return _NUMBER.sub(" specialnumber ", text.lower())


def make_vectorizer() -> TfidfVectorizer:
    from sklearn.feature_extraction.text import TfidfVectorizer  # on first use (see above)

    return TfidfVectorizer(preprocessor=normalize_text, ngram_range=(1, 2))


@dataclass
class TfidfModel:
    """A fitted TF-IDF + logistic regression: ``proba(texts)`` -> (n, n_classes)."""

    vocabulary: dict[str, int]
    idf: np.ndarray  # (features,)
    coef: np.ndarray  # (1, features) for two classes, else (classes, features)
    intercept: np.ndarray
    n_classes: int

    @classmethod
    def fit(cls, texts: Sequence[str], labels: Sequence[int], n_classes: int,
            c: float = ENSEMBLE_C, seed: int = 0) -> TfidfModel:
        """Balanced class weights: the network's loss may weight classes or not; this model
        should not lean to the majority class on an imbalanced set either way."""
        if len(set(labels)) < 2:
            raise ValueError("the TF-IDF model needs at least two classes in the training rows")
        from sklearn.linear_model import LogisticRegression  # on first use (module comment)

        vectorizer = make_vectorizer()
        x = vectorizer.fit_transform(texts)
        clf = LogisticRegression(C=c, class_weight="balanced", max_iter=2000, random_state=seed,
                                 solver="liblinear" if n_classes == 2 else "lbfgs")
        clf.fit(x, labels)
        coef, intercept = clf.coef_, clf.intercept_
        if list(clf.classes_) != list(range(n_classes)):  # a class missing from the rows
            raise ValueError(f"the TF-IDF model saw classes {list(clf.classes_)} of "
                             f"{n_classes}: every class needs training rows")
        vocab = {term: int(i) for term, i in vectorizer.vocabulary_.items()}
        return cls(vocab, vectorizer.idf_.astype(np.float64), coef.astype(np.float64),
                   intercept.astype(np.float64), n_classes)

    def proba(self, texts: Sequence[str]) -> torch.Tensor:
        from sklearn.feature_extraction.text import CountVectorizer  # on first use
        from sklearn.preprocessing import normalize

        counts = CountVectorizer(preprocessor=normalize_text, ngram_range=(1, 2),
                                 vocabulary=self.vocabulary).transform(texts)
        x = normalize(counts.multiply(self.idf).tocsr(), norm="l2")
        z = np.asarray(x @ self.coef.T) + self.intercept
        if self.n_classes == 2:
            p1 = 1.0 / (1.0 + np.exp(-z[:, 0]))
            p = np.stack([1.0 - p1, p1], axis=1)
        else:
            z = z - z.max(axis=1, keepdims=True)
            p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        return torch.from_numpy(p).float()

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        (directory / TFIDF_JSON).write_text(json.dumps(
            {"n_classes": self.n_classes, "features": "tfidf word 1-2-grams, numbers -> "
             "specialnumber, lower-case", "vocabulary": self.vocabulary}))
        save_file({"idf": self.idf, "coef": self.coef, "intercept": self.intercept},
                  str(directory / TFIDF_WEIGHTS))

    @classmethod
    def load(cls, directory: str | Path) -> TfidfModel:
        directory = Path(directory)
        for name in (TFIDF_JSON, TFIDF_WEIGHTS):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name}: missing (labels.json says the "
                                        "classifier has a TF-IDF ensemble member)")
        meta = read_json(directory / TFIDF_JSON)
        arrays = read_safetensors(directory / TFIDF_WEIGHTS)
        missing = ([f"{TFIDF_JSON}: {k}" for k in ("vocabulary", "n_classes") if k not in meta]
                   + [f"{TFIDF_WEIGHTS}: {k}" for k in ("idf", "coef", "intercept")
                      if k not in arrays])
        if missing:
            raise ValueError(f"{directory}: the TF-IDF ensemble member lacks {missing}")
        return cls(meta["vocabulary"], arrays["idf"].double().numpy(),
                   arrays["coef"].double().numpy(), arrays["intercept"].double().numpy(),
                   int(meta["n_classes"]))
