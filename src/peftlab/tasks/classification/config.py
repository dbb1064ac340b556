"""The ``classification:`` section of a run config (registered with the task, validated by peftlab.config)."""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.config import ConfigError, choice


@dataclass
class ClassificationConfig:
    """``task: classification``: a new head on the model, or label words scored by a causal LM."""

    mode: str = "head"  # head | verbalizer
    verbalizer: dict[str, str] | None = None  # label -> word (verbalizer mode; default: the label)
    class_weights: str = "none"  # none | balanced (n_samples / (n_classes * count_c))
    prompt_template: str | None = None  # verbalizer mode, e.g. "Review: {text}\nSentiment:"

    def validate(self, where: str) -> None:
        choice(f"{where}.mode", self.mode, ["head", "verbalizer"])
        choice(f"{where}.class_weights", self.class_weights, ["none", "balanced"])
        if self.verbalizer is not None:
            for label, word in self.verbalizer.items():
                if not isinstance(word, str) or not word.strip():
                    raise ConfigError(f"{where}.verbalizer.{label}: expected a non-empty word, "
                                      f"got {word!r}")
        if self.prompt_template is not None and "{text}" not in self.prompt_template:
            raise ConfigError(f"{where}.prompt_template must contain {{text}}, "
                              f"got {self.prompt_template!r}")
