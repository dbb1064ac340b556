"""The ``classification:`` section of a run config (registered with the task, validated by peftlab.config)."""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.config import ConfigError, choice
from peftlab.evaluation.metrics import THRESHOLD_METRICS


@dataclass
class ClassificationConfig:
    """``task: classification``: a new head on the model, or label words scored by a causal LM."""

    mode: str = "head"  # head | verbalizer
    verbalizer: dict[str, str] | None = None  # label -> word (verbalizer mode; default: the label)
    class_weights: str = "none"  # none | balanced (n_samples / (n_classes * count_c))
    prompt_template: str | None = None  # verbalizer mode, e.g. "Review: {text}\nSentiment:"
    # Binary only. null: the likelier class; a number: the positive class (the second label)
    # when its probability is >= it; auto: the number that maximises threshold_metric on the
    # validation set after training (saved in labels.json, used by predict and eval).
    threshold: float | str | None = None
    threshold_metric: str = "f1"  # f1 (of the positive class) | macro_f1 | accuracy
    loss: str = "cross_entropy"  # cross_entropy | focal (down-weights easy examples)
    focal_gamma: float = 2.0  # focal loss: (1 - p_true) ** gamma times cross-entropy
    # tfidf: average the class probabilities with a TF-IDF logistic regression fitted on the
    # training rows (validation metrics, threshold, predict/eval/serve all read the mean)
    ensemble: str = "none"  # none | tfidf
    # model: the model's own pooling (BERT: the pooler on [CLS]; decoders: the last token);
    # mean: the mean of the last hidden states over the real tokens, as sentence-embedding
    # checkpoints (all-MiniLM, sentence-transformers) were trained to be read
    pooling: str = "model"  # model | mean

    def validate(self, where: str) -> None:
        choice(f"{where}.mode", self.mode, ["head", "verbalizer"])
        choice(f"{where}.class_weights", self.class_weights, ["none", "balanced"])
        choice(f"{where}.threshold_metric", self.threshold_metric, THRESHOLD_METRICS)
        choice(f"{where}.loss", self.loss, ["cross_entropy", "focal"])
        choice(f"{where}.ensemble", self.ensemble, ["none", "tfidf"])
        choice(f"{where}.pooling", self.pooling, ["model", "mean"])
        if self.pooling == "mean" and self.mode != "head":
            raise ConfigError(f"{where}.pooling: mean applies to mode: head (a verbalizer reads "
                              "the next-token logits)")
        if isinstance(self.threshold, str):
            choice(f"{where}.threshold", self.threshold, ["auto"])
        elif self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"{where}.threshold must be a probability in (0, 1), auto or "
                              f"null, got {self.threshold}")
        if self.focal_gamma < 0:
            raise ConfigError(f"{where}.focal_gamma must be >= 0, got {self.focal_gamma}")
        if self.verbalizer is not None:
            for label, word in self.verbalizer.items():
                if not isinstance(word, str) or not word.strip():
                    raise ConfigError(f"{where}.verbalizer.{label}: expected a non-empty word, "
                                      f"got {word!r}")
        if self.prompt_template is not None and "{text}" not in self.prompt_template:
            raise ConfigError(f"{where}.prompt_template must contain {{text}}, "
                              f"got {self.prompt_template!r}")
