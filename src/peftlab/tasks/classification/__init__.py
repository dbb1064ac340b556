"""``task: classification``: a trained head or label words of a causal LM; prediction and
the in-context few-shot baseline."""

from peftlab.tasks.classification.config import ClassificationConfig
from peftlab.tasks.classification.task import ClassificationTask, VerbalizerTask

__all__ = ["ClassificationConfig", "ClassificationTask", "VerbalizerTask"]
