"""``task: pretrain``: continued (domain-adaptive) pre-training on raw text, causal or masked LM."""

from peftlab.tasks.pretrain.config import PretrainConfig
from peftlab.tasks.pretrain.task import CausalPretrainTask, MaskedPretrainTask

__all__ = ["CausalPretrainTask", "MaskedPretrainTask", "PretrainConfig"]
